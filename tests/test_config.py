"""Config flows one way: dataclass defaults, then the YAML file, then the flags the user typed."""
from pathlib import Path

import pytest

from peftgen import config as config_lib
from peftgen.errors import PeftgenError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_all_there():
    names = {path.name for path in CONFIGS}
    assert {"full.yaml", "lora.yaml", "8bit.yaml", "gpt2-booksummaries.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_against_the_code(path):
    raw = config_lib.read_yaml(path)
    cfg = config_lib.resolve(path)
    for key, value in raw.items():  # every key reached the dataclass unchanged
        assert getattr(cfg, key) == value, key


def test_booksummaries_config_is_the_articles_recipe():
    cfg = config_lib.resolve(Path(__file__).parent.parent / "configs" / "gpt2-booksummaries.yaml")
    assert (cfg.model, cfg.mode, cfg.batch_size, cfg.learning_rate, cfg.epochs, cfg.eval_steps) == (
        "gpt2", "full", 2, 5e-5, 5.0, 500
    )


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.txt\nlr: 0.001\nbatch_size: 3\n")
    cfg = config_lib.resolve(path, {"lr": 0.5, "batch_size": None})  # None: flag not typed
    assert cfg.lr == 0.5 and cfg.batch_size == 3 and cfg.epochs == 5.0


def test_lr_defaults_per_mode():
    assert config_lib.resolve(None, {"train_file": "t", "mode": "full"}).learning_rate == 5e-5
    assert config_lib.resolve(None, {"train_file": "t", "mode": "lora"}).learning_rate == 2e-4


def test_unknown_key_names_the_file_the_key_and_a_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.txt\nlearning_rate: 0.1\n")
    with pytest.raises(PeftgenError, match=r"c\.yaml: unknown key 'learning_rate'"):
        config_lib.resolve(path)
    path.write_text("train_file: t.txt\nbatch_sise: 2\n")
    with pytest.raises(PeftgenError, match="Did you mean 'batch_size'"):
        config_lib.resolve(path)


def test_wrong_type_names_key_file_and_expected_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.txt\nbatch_size: two\n")
    with pytest.raises(PeftgenError, match=r"c\.yaml: 'batch_size' must be int, got 'two'"):
        config_lib.resolve(path)


def test_ints_are_accepted_for_floats_but_not_bools_for_ints(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.txt\nlr: 1\nbatch_size: true\n")
    with pytest.raises(PeftgenError, match="'batch_size' must be int"):
        config_lib.resolve(path)


def test_bad_yaml_and_non_mapping_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: [unclosed\n")
    with pytest.raises(PeftgenError, match="is not valid YAML"):
        config_lib.resolve(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(PeftgenError, match="must be a mapping"):
        config_lib.resolve(path)


def test_unknown_mode_lists_the_modes():
    with pytest.raises(PeftgenError, match=r"Unknown mode 'lroa'\. Choose one of: full, lora, 8bit\."):
        config_lib.resolve(None, {"train_file": "t", "mode": "lroa"})


def test_target_modules_accepts_a_comma_list():
    cfg = config_lib.resolve(None, {"train_file": "t", "target_modules": "c_attn, c_fc"})
    assert cfg.target_modules == ["c_attn", "c_fc"]


def test_saved_config_round_trips(tmp_path):
    cfg = config_lib.resolve(None, {"train_file": "t", "mode": "full", "seed": 7})
    config_lib.save(cfg, tmp_path / "peftgen.yaml", {"new_token_ids": [1, 2]})
    data = config_lib.read_yaml(tmp_path / "peftgen.yaml")
    again = config_lib.resolve(None, {k: v for k, v in data.items() if k in config_lib.FIELDS})
    assert again == config_lib.resolve(None, {"train_file": "t", "mode": "full", "seed": 7, "lr": 5e-5})
