"""benchmarks/training_speed.py keeps working: its quick mode runs the recipe and a peftgen row and prints the table."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "training_speed.py"


def test_quick_benchmark_prints_a_ratio_for_each_row(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--rows", "recipe,full", "--no-memory", "--repeats", "2", "--json", str(results), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if re.match(r"^(recipe|full)\s+\d", line)}
    assert set(rows) == {"recipe", "full"}, done.stdout
    assert "1.00x" in rows["recipe"]
    ratio = float(re.search(r"([\d.]+)x", rows["full"]).group(1))
    assert ratio > 0
    saving = float(rows["full"].split()[3])  # train_runtime less the timed loop: peftgen's final checkpoint
    assert saving > 0
    valid_loss = float(rows["full"].split()[5])
    assert 5 < valid_loss < 12  # a real loss per token of a near-random model over a 50k vocabulary
    rates = re.search(r"this machine's products \([\d x]+\): bf16 ([\d.]+) TFLOP/s, fp32 ([\d.]+)", done.stdout)
    assert rates and float(rates.group(1)) > 0 and float(rates.group(2)) > 0, done.stdout
    bound = re.search(r"full runs at (\d+)% of the bf16 products' bound; 3x the recipe would be (\d+)% of it", done.stdout)
    assert bound and int(bound.group(1)) > 0 and int(bound.group(2)) > 0, done.stdout
    # --repeats runs in rounds of every row, each round's rates printed, every run's rate in the last column
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("round ")] == ["round 1 of 2", "round 2 of 2"]
    assert all(re.search(r"recipe \d+, full \d+$", line) for line in done.stdout.splitlines() if line.startswith("round "))
    assert re.search(r"\d+/\d+$", rows["full"]), rows["full"]
    assert re.search(r"^within each round: full over recipe [\d.]+x [\d.]+x \(median [\d.]+x; target 3x\)$", done.stdout, re.M), done.stdout
    recorded = json.loads(results.read_text())
    # the products' rates measured at the start, not overwritten by the rounds' report (a second shape reads them)
    assert set(recorded["products_tflops"]) == {"bfloat16", "float32"}
    assert abs(recorded["products_tflops"]["bfloat16"] - float(rates.group(1))) < 0.01
    for entry in recorded["results"]:  # each step's seconds (to 0.1 ms), which make up the timed loop
        steps = entry["speed"]["step_seconds"]
        assert len(steps) >= 1 and all(s > 0 for s in steps)
        assert abs(sum(steps) - entry["speed"]["loop"]) <= 1e-4 * len(steps)


PAIRS = SCRIPT.parent / "step_pairs.py"


def _script(path, monkeypatch):
    """A benchmark script imported as a module (beside its sibling modules)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_pairs_times_each_variant_in_turn_against_the_first(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    variants = ["--variant", "recomputed={}", "--variant", 'kept={"keep_attention_probs": true}']
    done = subprocess.run(
        [sys.executable, str(PAIRS), "--quick", "--mode", "lora", *variants, "--rounds", "2", "--steps", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {m.group(1): m for m in re.finditer(r"^(recomputed|kept)\s+([\d.]+)\s+([\d.]+)x\s+(\d+) (\d+)$", done.stdout, re.M)}
    assert set(rows) == {"recomputed", "kept"}, done.stdout
    assert rows["recomputed"].group(3) == "1.000"
    assert all(float(row.group(2)) > 0 for row in rows.values())
    assert re.search(r"tiny lora: one step of the epoch's largest batch \((\d+) label tokens\)", done.stdout), done.stdout


def test_step_pairs_refuses_what_it_cannot_compare(monkeypatch):
    pairs = _script(PAIRS, monkeypatch)
    assert pairs.parse_variant('kept={"keep_attention_probs": true}') == ("kept", {"keep_attention_probs": True})
    for text, says in [
        ("no-equals-sign", "NAME=JSON"),
        ("x={not json}", "not JSON"),
        ("x=[1, 2]", "JSON object"),
        ('x={"reuse_memory": true}', "change the process"),
    ]:
        try:
            pairs.parse_variant(text)
        except SystemExit as error:
            assert says in str(error), (text, error)
        else:
            raise AssertionError(f"{text!r} was accepted")


def test_every_ablation_changes_what_its_mode_runs(monkeypatch):
    # An ablation named for a technique switched off must differ from the mode's
    # defaults in effect, not only in spelling (reuse_memory: false where the
    # mode's null already means off would time the default twice).
    import dataclasses

    from peftgen import config as config_lib

    speed = _script(SCRIPT, monkeypatch)
    in_effect = {  # settings whose null means "the mode's default", and the property that resolves it
        "fused_loss": "fuses_loss",
        "reuse_memory": "reuses_memory",
        "keep_attention_probs": "keeps_attention_probs",
        "lean_malloc": "leans_malloc",
        "lean_layers": "leans_layers",
        "gradient_checkpointing": "checkpointing",
        "checkpoint_layers": "checkpointed_share",
        "lr": "learning_rate",
    }

    def effective(config):
        values = dataclasses.asdict(config)
        return {name: getattr(config, in_effect[name]) if name in in_effect else value for name, value in values.items()}

    for name, (mode, overrides) in speed.ABLATIONS.items():
        default = config_lib.resolve(None, {"model": "m", "mode": mode, "train_file": "x"})
        ablated = config_lib.apply(default, overrides, name)
        changed = {key for key, value in effective(ablated).items() if effective(default)[key] != value}
        assert changed, f"{name!r} runs {mode}'s defaults"


def test_shorter_pieces_give_more_steps_and_the_memory_file_stays_at_512_tokens(tmp_path, monkeypatch):
    # --piece-tokens 128 --pieces 96: the speed data are pieces of at most 128
    # tokens, and the memory rows still get lines cut to 2 x 512 tokens.
    from transformers import AutoTokenizer

    from peftgen.preparation import TokenCounter

    speed = _script(SCRIPT, monkeypatch)
    count = TokenCounter(AutoTokenizer.from_pretrained(str(speed.TOKENIZER))).example  # as peftgen train builds an example

    def tokens(line):
        return count(line.removeprefix("<BOS> ").removesuffix(" <EOS>"))

    for piece_tokens, pieces in [(128, 96), (512, 24)]:
        files = speed.build_data(tmp_path / str(piece_tokens), pieces, 8, piece_tokens)
        train = files["train"].read_text(encoding="utf-8").splitlines()
        assert len(train) == pieces
        lengths = [tokens(line) for line in train]
        assert max(lengths) <= piece_tokens and max(lengths) > piece_tokens // 2, lengths
        long_lines = files["long"].read_text(encoding="utf-8").splitlines()
        assert len(long_lines) == 6 and all(tokens(line) > 512 for line in long_lines)


def test_piece_options_are_refused_outside_their_range():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, says in [(["--pieces", "0"], "--pieces"), (["--piece-tokens", "32"], "--piece-tokens takes 64 to 512")]:
        done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr[-500:])


def test_round_by_round_gives_each_rounds_own_ratio_and_their_median(monkeypatch):
    bench = _script(SCRIPT, monkeypatch)

    def run(tokens_per_second):
        return {"label_tokens": 1000, "loop": 1000 / tokens_per_second}

    # The machine runs slower in round 2: both rows slow together, so each round's ratio holds.
    speeds = {
        "recipe": [run(100), run(50), run(100)],
        "full": [run(300), run(160), run(310)],
        "lora": [run(420), run(240), {"error": "killed"}],
    }
    line = bench.round_by_round(speeds)
    assert "full over recipe 3.00x 3.20x 3.10x (median 3.10x; target 3x)" in line
    # the failed round of lora is left out, not counted as a zero
    assert "lora over full 1.40x 1.50x (median 1.45x; target 1.4x)" in line
    assert "8bit" not in line  # a row that did not run has no ratio
    assert bench.round_by_round({"recipe": [run(100)]}) == ""
