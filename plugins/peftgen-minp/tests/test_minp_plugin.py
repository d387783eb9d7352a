"""peftgen-minp: conforms to peftgen's decoder contract and is found once installed."""

import importlib.metadata
import json

import pytest
import torch
from peftgen_minp import MinP
from typer.testing import CliRunner

from peftgen.generation import build_decoder, generate
from peftgen.generation.decoder import DecodeContext
from peftgen.testing import check_decoder, isolated_plugins, tiny_model


@pytest.mark.parametrize("options", [{}, {"p_min": 0.3, "temperature": 0.7}, {"p_min": 1.0}])
def test_minp_passes_the_conformance_kit(options):
    check_decoder(MinP, **options)


def test_minp_only_samples_tokens_above_p_min_times_the_top_probability():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 50, generator=generator) * 2  # (B, V), 2000 different rows
    chosen = MinP(p_min=0.2).select(logits, DecodeContext(generator, logits[:, :1].long(), logits[:, :1].long(), 0, 1))
    probs = torch.softmax(logits, dim=-1)
    picked = probs.gather(1, chosen[:, None]).squeeze(1)
    assert (picked >= 0.2 * probs.amax(dim=-1)).all()
    assert (picked < probs.amax(dim=-1)).any()  # and it does sample, not always the top token


def test_p_min_of_one_is_greedy():
    from peftgen.decoders.greedy import Greedy

    minp = generate(tiny_model(), [[1, 2, 3]], MinP(p_min=1.0), max_new_tokens=8, seed=0)
    greedy = generate(tiny_model(), [[1, 2, 3]], Greedy(), max_new_tokens=8)
    assert minp[0][0].token_ids == greedy[0][0].token_ids


def test_bad_p_min_is_a_clear_error():
    from peftgen.errors import PeftgenError

    with pytest.raises(PeftgenError, match=r"Decoder 'minp' rejected its options: p_min must be in \(0, 1\], got 0.0"):
        build_decoder(MinP, {"p_min": "0"})


def test_the_installed_entry_point_makes_peftgen_list_it():
    entry_points = [ep for ep in importlib.metadata.entry_points(group="peftgen") if ep.name == "minp"]
    assert [ep.value for ep in entry_points] == ["peftgen_minp"], "pip install -e plugins/peftgen-minp first"
    from peftgen.cli import app

    with isolated_plugins():
        result = CliRunner().invoke(app, ["decoders", "--json"])
    assert result.exit_code == 0, result.output
    minp = [d for d in json.loads(result.stdout) if d["name"] == "minp"]
    assert minp and minp[0]["plugin"] == "minp" and minp[0]["source"].startswith("peftgen-minp ")
    assert [(o["name"], o["type"], o["default"]) for o in minp[0]["options"]] == [("p_min", "float", 0.05), ("temperature", "float", 1.0)]
