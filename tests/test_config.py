"""Config flows one way: dataclass defaults, then the YAML file, then the flags the user typed."""

import re
from pathlib import Path

import pytest

from peftgen import config as config_lib
from peftgen.errors import PeftgenError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_all_there():
    names = {path.name for path in CONFIGS}
    assert {"full.yaml", "lora.yaml", "8bit.yaml", "gpt2-booksummaries.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_against_the_code(path):
    raw = config_lib.read_yaml(path)
    cfg = config_lib.resolve(path)
    for key, value in raw.items():  # every key reached the dataclass unchanged
        assert getattr(cfg, key) == value, key


def test_booksummaries_config_is_the_articles_recipe():
    cfg = config_lib.resolve(Path(__file__).parent.parent / "configs" / "gpt2-booksummaries.yaml")
    assert (cfg.model, cfg.mode, cfg.batch_size, cfg.learning_rate, cfg.epochs, cfg.eval_steps) == ("gpt2", "full", 2, 5e-5, 5.0, 500)


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


def test_saved_config_is_a_config_file_as_it_is(tmp_path):
    cfg = config_lib.resolve(
        None,
        {"train_file": "t", "mode": "full", "seed": 7, "target_modules": "a,b", "sample_options": {"k": 5}, "attention_dropout": None, "report_to": "none"},
    )
    config_lib.save(cfg, tmp_path / "peftgen.yaml")
    assert config_lib.resolve(tmp_path / "peftgen.yaml") == config_lib.apply(cfg, {"lr": 5e-5}, "test")
    assert set(config_lib.read_yaml(tmp_path / "peftgen.yaml")) == set(config_lib.FIELDS)


def test_a_library_call_takes_a_config_a_yaml_file_or_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.txt\nlora_r: 3\n")
    expected = config_lib.resolve(path)
    assert config_lib.load(path) == config_lib.load(str(path)) == expected
    assert config_lib.load({"train_file": "t.txt", "lora_r": 3}) == config_lib.load(expected) == expected
    with pytest.raises(PeftgenError, match="settings: unknown key 'lora_rank'. Did you mean 'lora_r'"):
        config_lib.load({"train_file": "t.txt", "lora_rank": 3})
    with pytest.raises(PeftgenError, match="No training data"):
        config_lib.load(config_lib.TrainConfig())


def test_resume_and_overwrite_are_not_settings():
    assert "resume" not in config_lib.FIELDS and "overwrite" not in config_lib.FIELDS


# One definition per setting ----------------------------------------------------------


def test_every_setting_has_a_one_line_help():
    for name, field in config_lib.FIELDS.items():
        text = field.metadata.get("help", "")
        assert text and "\n" not in text and text.endswith("."), name


def test_docs_settings_md_is_generated_from_the_code():
    """If this fails after a setting changed: python -m peftgen.config > docs/settings.md"""
    docs = Path(__file__).parent.parent / "docs" / "settings.md"
    assert docs.read_text(encoding="utf-8") == config_lib.settings_table()


def test_the_settings_table_has_a_row_per_setting_with_type_and_default():
    rows = [line for line in config_lib.settings_table().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(config_lib.FIELDS)
    assert "| `lora_r` | int | `8` | LoRA rank. |" in rows
    assert "| `lr` | float or null | 5e-5 full, 2e-4 lora/8bit | Peak learning rate. |" in rows
    assert "| `packing` | bool | `true` |" in next(row for row in rows if "`packing`" in row)
    assert "| `target_modules` | list of str or null | per architecture |" in next(row for row in rows if "target_modules" in row)


# Every value checked before a model loads -------------------------------------------


def refused(**values):
    with pytest.raises(PeftgenError) as caught:
        config_lib.resolve(None, {"train_file": "t", **values})
    return str(caught.value)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": float("nan")}, "lr must be a finite number, got nan."),
        ({"lr": float("inf")}, "lr must be a finite number, got inf."),
        ({"lr": -1e-4}, "lr must be above 0, got -0.0001. Typical: 5e-5 for full, 2e-4 for lora and 8bit."),
        ({"lr": 0}, "lr must be above 0, got 0."),
        ({"epochs": -1}, "epochs must be above 0 and at most 1e+06, got -1. Try 3 to 5."),
        ({"epochs": float("nan")}, "epochs must be a finite number, got nan."),
        ({"epochs": 0}, "epochs must be above 0 and at most 1e+06, got 0."),
        ({"lora_dropout": -0.1}, "lora_dropout is a probability in [0, 1), got -0.1. Typical: 0 to 0.1."),
        ({"lora_dropout": 1.0}, "lora_dropout is a probability in [0, 1), got 1."),
        ({"warmup_steps": -5}, "warmup_steps must be 0 or more, got -5."),
        ({"logging_steps": 0}, "logging_steps must be at least 1, got 0."),
        ({"max_steps": -2}, "max_steps must be -1 (train for epochs) or a number of updates, got -2."),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number, got nan."),
        ({"weight_decay": -0.1}, "weight_decay must be 0 or more, got -0.1. Typical: 0 or 0.01."),
        ({"seed": -1}, "seed must be between 0 and 4294967295, got -1."),
        ({"seed": 2**32}, "seed must be between 0 and 4294967295, got 4294967296."),
        ({"seed": 2**64}, "seed 18446744073709551616 is far too large."),
        ({"batch_size": 10**6}, "batch_size 1000000 is larger than any device holds (at most 65536)."),
        ({"max_length": 2**40}, "max_length must be at most 2147483647, got 1099511627776."),
        ({"lora_alpha": 0}, "lora_alpha must be at least 1, got 0."),
        ({"pad_token": ""}, "pad_token must be a non-empty marker without surrounding whitespace or line breaks, got ''. Default: <PAD>."),
        ({"bos_token": " <BOS>"}, "bos_token must be a non-empty marker"),
        ({"eos_token": "<E\nOS>"}, "eos_token must be a non-empty marker"),
        ({"train_file": "data\0.txt"}, "train_file contains a NUL byte: 'data\\x00.txt'."),
        ({"model": " "}, "model is empty: pass --model"),
        ({"report_to": "tensorbord"}, "Unknown report_to 'tensorbord'. Choose from: azure_ml, clearml, codecarbon, comet_ml,"),
    ],
)
def test_values_a_library_would_reject_later_are_refused_first(values, message):
    assert message in refused(**values)


def test_epochs_may_be_zero_when_max_steps_sets_the_length():
    assert config_lib.resolve(None, {"train_file": "t", "epochs": 0, "max_steps": 5}).max_steps == 5


def test_a_tracker_that_is_not_installed_says_how_to_install_it(monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["wandb"])
    assert refused(report_to="tensorboard,wandb") == ("report_to tensorboard needs its package, which is not installed: pip install tensorboard")
    assert config_lib.resolve(None, {"train_file": "t", "report_to": "wandb"}).report_to == ["wandb"]
    assert config_lib.resolve(None, {"train_file": "t", "report_to": "none"}).report_to == ["none"]


def test_a_float_written_without_a_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.txt\nlr: 1e-4\n")  # YAML 1.1 reads this as the string '1e-4'
    assert config_lib.resolve(path).lr == 1e-4


def test_an_echoed_value_is_cut_short(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.txt\nbatch_size: " + "x" * 100_000 + "\n")
    message = refused_file(path)
    assert message.startswith(f"{path}: 'batch_size' must be int, got 'xxx") and len(message) < len(str(path)) + 200


def refused_file(path):
    with pytest.raises(PeftgenError) as caught:
        config_lib.resolve(path)
    return str(caught.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("train_file: café\n".encode("latin-1"), r"c\.yaml is not UTF-8 text \(byte 15\)\. Save it as UTF-8\."),
        (("a: " + "[" * 5000 + "]" * 5000).encode(), r"c\.yaml is nested too deeply to be a config"),
        (b"seed: 2020-13-45\n", r"c\.yaml holds a value YAML cannot read: month must be in 1\.\.12"),
        (b"train_file: [unclosed\n", r"c\.yaml is not valid YAML: expected ',' or '\]', but got '<stream end>' \(line 2, column 1\)\.$"),
        (b"1: 2\n", r"c\.yaml: unknown key 1\. Valid keys: model,"),
        (("k" * 1000 + ": 1\n").encode(), r"c\.yaml: unknown key 'k{20,30}\.\.\.k{20,30}'\. Valid keys"),
    ],
)
def test_a_damaged_config_file_gets_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert re.search(message, refused_file(path))
