"""peftgen merge: a plain Hugging Face folder whose logits match the unmerged run's."""

import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftgen import merging as merge_lib
from peftgen import model as model_lib
from peftgen import run_files
from peftgen.errors import PeftgenError

IDS = torch.tensor([[50257, 464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50258]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("mode,atol", [("lora", 1e-5), ("8bit", 2e-2)])
def test_merged_folder_loads_without_peft_and_matches_the_run(mode, atol, tiny_gpt2, make_run, tmp_path):
    if mode == "8bit":
        pytest.importorskip("bitsandbytes")
    run = make_run(mode, tiny_gpt2)
    out = merge_lib.merge(run, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert type(plain).__name__ == "GPT2LMHeadModel"
    assert getattr(plain.config, "quantization_config", None) is None
    assert AutoTokenizer.from_pretrained(out).eos_token == "<EOS>"
    unmerged, _ = model_lib.load(run, merge=False)
    expected = logits(unmerged)
    # 8-bit: the unmerged run multiplies int8 weights by fp16-cast activations;
    # the merged folder holds the same dequantised weights in float32.
    assert torch.allclose(logits(plain), expected, atol=atol)
    assert logits(plain).argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_8bit_merge_restores_gpt2_conv1d_layout(tiny_gpt2, make_run, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers.pytorch_utils import Conv1D

    plain = AutoModelForCausalLM.from_pretrained(merge_lib.merge(make_run("8bit", tiny_gpt2), tmp_path / "m"))
    assert isinstance(plain.transformer.h[0].attn.c_proj, Conv1D)
    assert plain.transformer.h[0].attn.c_attn.weight.shape == (64, 192)  # (in, out)


def test_llama_lora_merges(tiny_llama, make_run, tmp_path):
    run = make_run("lora", tiny_llama)
    plain = AutoModelForCausalLM.from_pretrained(merge_lib.merge(run, tmp_path / "m"))
    assert torch.allclose(logits(plain), logits(model_lib.load(run, merge=False)[0]), atol=1e-5)


def test_merge_refuses_to_overwrite_and_to_merge_a_full_run(tiny_gpt2, make_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(PeftgenError, match="already exists and is not empty. Pass --overwrite"):
        merge_lib.merge(make_run("lora", tiny_gpt2), tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(PeftgenError, match="is a full fine-tuning run"):
        merge_lib.merge(make_run("full", tiny_gpt2), tmp_path / "m")
    with pytest.raises(PeftgenError, match="is not a peftgen run folder"):
        merge_lib.merge(tiny_gpt2, tmp_path / "m")


@pytest.mark.parametrize("where", ["run", "parent of run", "inside run", "base", "parent of base", "inside base"])
def test_merge_refuses_an_output_that_is_contains_or_lies_in_the_run_or_its_base(where, tiny_gpt2, make_run, tmp_path):
    # A run and its base in folders of their own, so that each case meets one check.
    base = shutil.copytree(tiny_gpt2, tmp_path / "models" / "base")
    run = shutil.copytree(make_run("lora", tiny_gpt2), tmp_path / "runs" / "run")
    settings = yaml.safe_load((run / "peftgen.yaml").read_text())
    (run / "peftgen.yaml").write_text(yaml.safe_dump({**settings, "model": str(base)}))
    output, message = {
        "run": (run, "is the run folder"),
        "parent of run": (run.parent, "contains the run folder"),
        "inside run": (run / "merged", "lies inside the run folder"),
        "base": (base, "is the run's base model"),
        "parent of base": (base.parent, "contains the run's base model"),
        "inside base": (base / "merged", "lies inside the run's base model"),
    }[where]
    before = sorted(p.name for p in run.iterdir()), sorted(p.name for p in base.iterdir())
    with pytest.raises(PeftgenError, match=f"--output .* {message}"):
        merge_lib.merge(run, output, overwrite=True)
    assert (sorted(p.name for p in run.iterdir()), sorted(p.name for p in base.iterdir())) == before
    assert run_files.is_run(run) and not (run / "merged").exists() and not (base / "merged").exists()


def test_merge_refuses_an_output_under_a_file_before_loading(tiny_gpt2, make_run, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PeftgenError, match=r"The folder of --output .*file is a file, not a folder"):
        merge_lib.merge(make_run("lora", tiny_gpt2), tmp_path / "file" / "merged")


def test_overwrite_replaces_the_old_output_only_once_the_new_one_is_complete(tiny_gpt2, make_run, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old merge")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(PeftgenError, match=r"Cannot write the merged model to .*merged: No space left on device\."):
        merge_lib.merge(make_run("lora", tiny_gpt2), out, overwrite=True)
    assert (out / "keep.txt").read_text() == "old merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no half-written folder beside it


def test_the_merge_command_refuses_the_runs_parent_as_one_error_line(tiny_gpt2, make_run):
    from typer.testing import CliRunner

    from peftgen.cli import app

    run = make_run("lora", tiny_gpt2)
    result = CliRunner().invoke(app, ["merge", str(run), "--output", str(run.parent), "--overwrite"])
    assert result.exit_code == 1
    assert result.stderr == (f"Error: --output {run.parent} contains the run folder ({run}); replacing it would delete that. Choose another --output.\n")
    assert run_files.is_run(run)
