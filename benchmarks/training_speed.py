"""Training speed and peak memory of peftgen's modes against plain transformers.Trainer.

    python benchmarks/training_speed.py                 # GPT-2 small and SmolLM2-135M shapes, every row
    python benchmarks/training_speed.py --shapes gpt2 --ablations
    python benchmarks/training_speed.py --quick         # a tiny model, a few steps: keeps the script working

Models are built from configs with random weights (GPT-2 small: 12 layers,
width 768; SmolLM2-135M's Llama shape: 30 layers, width 576) and the GPT-2
tokenizer plus <BOS>/<EOS>/<PAD>: nothing is downloaded. The data are the
shipped book-summary sample cut by ``peftgen prepare`` into pieces of at most
512 tokens: 24 training pieces, 8 validation pieces. ``--piece-tokens 128
--pieces 96`` cuts them shorter and takes more, for data of short lines
(batches of at most 256 tokens, 48 steps); the memory rows keep their
512-token examples.

Every row runs in a fresh process, so its peak memory is its own:

- speed: one epoch over the 24 pieces, batch 2, no evaluation during
  training; label tokens/s = predicted tokens (padding excluded) / the time
  from the first step's start to the last step's end. Checkpoint writing is
  left out of it for every row alike: peftgen writes a resumable checkpoint
  at the end of a run (model and optimizer state: about 4 s for GPT-2 full
  on 2 cores), and the recipe's script writes one every 500 steps, none
  within one short epoch. The "saving" column is Trainer's train_runtime
  less that time: mostly this final checkpoint. Then the validation loss per token of the trained weights,
  computed the same way for every row (fp32, token-weighted).
- memory: 3 steps of batch 2 x 512 tokens; peak resident memory of the
  process (ru_maxrss), which includes about 0.4 GB of imported libraries.
  On a GPU: the peak of torch.cuda.max_memory_allocated instead.

``--repeats N`` runs every row N times, in rounds of every row in turn, so
that the machine's drift over the run falls on all rows alike; each round's
rates are printed, the median run is shown, and every run's rate after it.
The targets' speed ratios are also given within each round (two rows of one
round ran minutes apart) with their median: they show how far each ratio
itself moves from round to round, which one ratio of two medians hides.

On a GPU a 12-step epoch is over in a second or two, mostly start-up, so
pass e.g. ``--epochs 10`` there; every row runs the same epochs.

Rows: "recipe" is the article's run_language_modeling.py --line_by_line on
plain Trainer (fp32, padded to the longest example, its default optimizer,
the model's own dropout, lr 5e-5); "trainer-bf16" is the same with bf16=True;
then peftgen train --mode full / lora / 8bit at their defaults. --ablations
adds peftgen rows with one technique switched off each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matmul_rates  # beside this script

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "assets" / "gpt2-tokenizer"
SAMPLE = ROOT / "data" / "cmu-booksummaries-sample.tsv"

SHAPES = {
    "gpt2": ("GPT-2 small (124M)", dict(kind="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024)),
    "smollm2": (
        "SmolLM2-135M shape (Llama, GPT-2 vocabulary)",
        dict(
            kind="llama",
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
    ),
    "tiny": ("tiny GPT-2 (quick check)", dict(kind="gpt2", n_layer=2, n_embd=64, n_head=2, n_positions=1024)),
}
ROWS = ["recipe", "trainer-bf16", "full", "lora", "8bit"]
# Each ablation is a peftgen mode with one setting changed from its default.
ABLATIONS = {
    "full, padded batches": ("full", {"packing": False}),
    "full, batches not padded to 64 tokens": ("full", {"token_multiple": 0}),
    "full, one masked attention per row": ("full", {"attention_per_example": False}),
    "full, PyTorch's flash attention": ("full", {"block_attention": False}),
    "full, attention probs recomputed": ("full", {"keep_attention_probs": False}),
    "full, transformers' loss": ("full", {"fused_loss": False}),
    "full, freed memory unmapped": ("full", {"reuse_memory": False}),
    "full, weights cast again for the backward": ("full", {"recast_weights": True}),
    "full, the model's own Llama layers": ("full", {"lean_layers": False}),
    "full, malloc's tcache and fast bins off": ("full", {"lean_malloc": True}),
    "full, lean malloc and weights cast again": ("full", {"lean_malloc": True, "recast_weights": True}),
    "full, a quarter of layers checkpointed": ("full", {"gradient_checkpointing": True, "checkpoint_layers": 0.25}),
    "full, model's attention dropout": ("full", {"attention_dropout": None}),
    "full, adamw_torch (not fused)": ("full", {"optim": "adamw_torch"}),
    "full, dense embedding gradient": ("full", {"embedding_row_grads": False}),
    "full, gelu_new as written": ("full", {"fused_activations": False}),
    "full, torch's dropout": ("full", {"fast_dropout": False}),
    "lora, fp32 frozen weights": ("lora", {"frozen_bf16": False}),
    "lora, fp32 frozen embeddings": ("lora", {"frozen_embeddings_bf16": False}),
    "lora, PEFT's token rows": ("lora", {"fast_token_rows": False}),
    "lora, batches not padded to 64 tokens": ("lora", {"token_multiple": 0}),
    "lora, transformers' loss": ("lora", {"fused_loss": False}),
    "lora, freed memory unmapped": ("lora", {"reuse_memory": False}),
    "lora, a quarter of layers checkpointed": ("lora", {"gradient_checkpointing": True}),
    "lora, every layer checkpointed": ("lora", {"gradient_checkpointing": True, "checkpoint_layers": 1.0}),
    "lora, lora_dropout 0.05": ("lora", {"lora_dropout": 0.05}),
    "lora, torch's dropout": ("lora", {"fast_dropout": False}),
    "lora, PEFT's LoRA forward": ("lora", {"fused_lora": False}),
    "lora, PyTorch's flash attention": ("lora", {"block_attention": False}),
    "lora, attention probs kept": ("lora", {"keep_attention_probs": True}),
    "lora, malloc's tcache and fast bins off": ("lora", {"lean_malloc": True}),
    "8bit, glibc's malloc as it comes": ("8bit", {"lean_malloc": False}),
}
BATCH, RECIPE_LR = 2, 5e-5


# ------------------------------------------------------------------ setup (parent process)


def build_model(shape: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    if (folder / "config.json").is_file():
        return folder
    spec = dict(SHAPES[shape][1])
    kind = spec.pop("kind")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = (GPT2Config if kind == "gpt2" else LlamaConfig)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **spec
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_data(folder: Path, n_train: int, n_valid: int, piece_tokens: int = 512) -> dict[str, Path]:
    """Speed files (pieces of at most ``piece_tokens`` tokens) and a memory file (every example exactly 512 tokens)."""
    from peftgen import preparation as prepare_lib

    prepared = folder / f"prepared-{piece_tokens}"
    if not (prepared / "train.txt").is_file():
        prepare_lib.prepare(SAMPLE, prepared, tokenizer=str(TOKENIZER), max_tokens=piece_tokens, overwrite=True)
    train = (prepared / "train.txt").read_text(encoding="utf-8").splitlines()
    valid = (prepared / "valid.txt").read_text(encoding="utf-8").splitlines()
    files = {"train": folder / "train.txt", "valid": folder / "valid.txt", "long": folder / "long.txt"}
    files["train"].write_text("\n".join(train[:n_train]) + "\n", encoding="utf-8")
    files["valid"].write_text("\n".join(valid[:n_valid]) + "\n", encoding="utf-8")
    # Pieces side by side make a line of well over 512 tokens, cut to 512 exactly.
    side_by_side = -(-1536 // piece_tokens)
    long_lines = [
        " ".join(line.replace("<BOS>", "").replace("<EOS>", "") for line in train[i : i + side_by_side]) for i in range(0, 6 * side_by_side, side_by_side)
    ]
    files["long"].write_text("\n".join(long_lines) + "\n", encoding="utf-8")
    return files


# ------------------------------------------------------------------ one row (child process)


def label_tokens(examples: list[list[int]]) -> int:
    return sum(len(ids) - 1 for ids in examples)  # position 0 is never predicted


class LoopTimer:
    """Seconds from the start of training to the end of its last step, for any Trainer made in this process.

    Trainer's train_runtime also holds the checkpoint written after the last
    step, which peftgen writes and plain Trainer with save_strategy "no" does
    not; timing the loop itself measures every row alike.
    """

    def __init__(self):
        from transformers import Trainer, TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.synchronize()
                timer.start = timer.end = time.perf_counter()
                timer.ends = []

            def on_step_end(self, args, state, control, **kwargs):
                timer.synchronize()  # a GPU's queued work belongs to the step
                timer.end = time.perf_counter()
                timer.ends.append(timer.end)

        self.start = self.end = 0.0
        self.ends: list[float] = []
        init = Trainer.__init__

        def add_timer(trainer, *args, **kwargs):
            init(trainer, *args, **kwargs)
            trainer.add_callback(Callback())

        Trainer.__init__ = add_timer

    @staticmethod
    def synchronize() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def steps(self) -> list[float]:
        """Seconds of each optimizer step (forward, backward, optimizer, and the loop's own work between)."""
        return [round(end - begin, 4) for begin, end in zip([self.start, *self.ends], self.ends)]


def run_plain(model_dir: Path, files: dict, bf16: bool, memory: bool, output: Path, epochs: int) -> dict:
    """The article's recipe: run_language_modeling.py --line_by_line on plain Trainer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from peftgen import data
    from peftgen import model as model_lib

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model_lib.add_special_tokens(model, tokenizer, "<BOS>", "<EOS>", "<PAD>")
    model.loss_type = "ForCausalLM"
    file = files["long" if memory else "train"]
    examples = data.load_examples(file, tokenizer, 512)
    args = TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=BATCH,
        learning_rate=RECIPE_LR,
        num_train_epochs=epochs,
        max_steps=3 if memory else -1,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=42,
        data_seed=42,
    )
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=data.LineDataset(examples), data_collator=collate)
    metrics = trainer.train().metrics
    result = {"runtime": metrics["train_runtime"], "train_loss": metrics["train_loss"], "label_tokens": label_tokens(examples) * epochs}
    result.update(peaks())
    if not memory:
        result["valid_loss"] = validation_loss(trainer.model, tokenizer, files["valid"])
    return result


def peftgen_config(model_dir: Path, train_file: Path, mode: str, overrides: dict, output: Path, epochs: int = 1, max_steps: int = -1):
    """The benchmark's settings for a peftgen run (batch 2, 512 tokens, no checkpoint within the epoch), then overrides."""
    from peftgen import config as config_lib

    settings = dict(
        model=str(model_dir),
        mode=mode,
        train_file=str(train_file),
        output_dir=str(output),
        batch_size=BATCH,
        epochs=epochs,
        max_steps=max_steps,
        save_steps=10_000,
        logging_steps=1,
        max_length=512,
    )
    # apply() keeps an override of None (e.g. attention_dropout: null), which resolve() reads as "not given"
    return config_lib.apply(config_lib.resolve(None, settings), overrides, "benchmark").validate()


def run_peftgen(model_dir: Path, files: dict, mode: str, overrides: dict, memory: bool, output: Path, epochs: int) -> dict:
    from peftgen import data
    from peftgen import model as model_lib
    from peftgen import training as train_lib

    train_file = files["long" if memory else "train"]
    config = peftgen_config(model_dir, train_file, mode, overrides, output, epochs, max_steps=3 if memory else -1)
    result = train_lib.train(config, overwrite=True, progress=False)
    out = {"runtime": result.metrics["train_runtime"], "train_loss": result.metrics["train_loss"], **peaks()}
    loaded, tokenizer = model_lib.load(output)
    out["label_tokens"] = label_tokens(data.load_examples(train_file, tokenizer, 512)) * epochs
    if not memory:
        out["valid_loss"] = validation_loss(loaded, tokenizer, files["valid"])
    return out


def validation_loss(model, tokenizer, file: Path) -> float:
    import torch

    from peftgen import evaluation as evaluate_lib

    model.eval()
    if not getattr(model, "is_quantized", False):  # int8 weights stay as they are, on their device
        model = model.float().to("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate_lib.evaluate(model, file, tokenizer=tokenizer, batch_size=4, max_length=512, precision="fp32", progress=False).loss


def peaks() -> dict[str, float]:
    """Peak resident memory of this process in GB, and on a GPU the peak of its allocated memory."""
    import torch

    out = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}  # Linux reports KiB
    if torch.cuda.is_available():
        out["peak_gpu"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def peak_of(memory: dict | None) -> float | None:
    """The peak a row's memory is judged by: GPU memory where there was a GPU, else resident memory."""
    if not memory or "error" in memory:
        return None
    return memory.get("peak_gpu", memory.get("peak_rss"))


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    files = {k: Path(v) for k, v in json.loads(args.files).items()}
    output = Path(tempfile.mkdtemp(prefix="row-", dir=args.work))
    overrides = json.loads(args.overrides)
    timer = LoopTimer()
    try:
        if args.row in ("recipe", "trainer-bf16"):
            result = run_plain(Path(args.model_dir), files, args.row == "trainer-bf16", args.memory, output, args.epochs)
        else:
            result = run_peftgen(Path(args.model_dir), files, args.row, overrides, args.memory, output, args.epochs)
    finally:
        shutil.rmtree(output, ignore_errors=True)  # a row's checkpoints are 0.5-1.5 GB; only its numbers are kept
    result["loop"] = timer.seconds
    result["step_seconds"] = timer.steps
    print("RESULT " + json.dumps(result), flush=True)


def profile_step(model_dir: Path, files: dict, repeats: int = 3) -> None:
    """Where one training step's time goes, before (plain Trainer bf16) and after (peftgen full).

    The step is cut at the last hidden state: forward of the layers, the
    loss (output layer + cross-entropy, forward and backward), backward of
    the layers, optimizer step. Batch: the first two training pieces.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftgen import attention, batching, data, efficiency
    from peftgen import model as model_lib
    from peftgen.fused_loss import linear_cross_entropy

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = data.load_examples(files["train"], tokenizer, 512)[:2]
    print(f"profile of one step, batch of {len(examples)} pieces ({', '.join(str(len(e)) for e in examples)} tokens), bf16 autocast, median of {repeats}")
    print(f"{'':11} {'forward':>8} {'loss':>8} {'backward':>8} {'optimizer':>9} {'total':>8}   (seconds)")
    # after = peftgen full at its defaults (transformers' loss); after+fused adds fused_loss: true
    for name in ("before", "after", "after+fused"):
        fused = name == "after+fused"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model_lib.add_special_tokens(model, tokenizer, "<BOS>", "<EOS>", "<PAD>")
        model.train()
        after = name != "before"
        if after:
            efficiency.set_attention_dropout(model, 0.0)
            efficiency.fuse_activations(model)
            attention.use_per_example_attention(model, blocks=True)
        batch = batching.collator(after, tokenizer.pad_token_id, per_example=after)([{"input_ids": ids} for ids in examples])
        labels = batch.pop("labels")
        body = model.get_decoder()
        weight = model.get_output_embeddings().weight
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True if after else None, foreach=None if after else True)
        times = []
        for _ in range(repeats + 1):
            marks = [time.perf_counter()]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = body(**{k: v for k, v in batch.items() if k not in ("max_length_q", "max_length_k")}).last_hidden_state  # (B, T, C)
                marks.append(time.perf_counter())
                detached = hidden.detach().requires_grad_()
                targets = labels[:, 1:]
                if fused:
                    keep = targets != data.IGNORE_INDEX
                    loss = linear_cross_entropy(detached[:, :-1][keep], weight, targets[keep]) / keep.sum()
                else:  # what transformers' ForCausalLMLoss does with the model's logits
                    logits = F.linear(detached, weight).float()
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=data.IGNORE_INDEX)
            loss.backward()
            marks.append(time.perf_counter())
            hidden.backward(detached.grad)
            marks.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            times.append([b - a for a, b in zip(marks, marks[1:])])
        parts = [statistics.median(t[i] for t in times[1:]) for i in range(4)]
        print(f"{name:11} {parts[0]:8.3f} {parts[1]:8.3f} {parts[2]:8.3f} {parts[3]:9.3f} {sum(parts):8.3f}")
    print("before: padded, the model's attention dropout, logits then cross-entropy, AdamW foreach")
    print("after:  packed with attention per example, attention dropout 0, one-kernel GELU, AdamW fused (peftgen full)")
    print("after+fused: the same with the fused output layer + cross-entropy (fused_loss: true)")


# ------------------------------------------------------------------ the table (parent process)


def run_row(name: str, row: str, overrides: dict, model_dir: Path, files: dict, work: Path, memory: bool, epochs: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--epochs",
        str(epochs),
        "--row",
        row,
        "--model-dir",
        str(model_dir),
        "--work",
        str(work),
        "--files",
        json.dumps({k: str(v) for k, v in files.items()}),
        "--overrides",
        json.dumps(overrides),
    ] + (["--memory"] if memory else [])
    from peftgen import allocator
    from peftgen import config as config_lib

    # A peftgen row's process starts as the peftgen program starts its training process (peftgen.allocator).
    peftgen_row = row not in ("recipe", "trainer-bf16")
    lean_malloc = peftgen_row and config_lib.resolve(None, {"mode": row, "train_file": "-", **overrides}).leans_malloc
    done = subprocess.run(command, capture_output=True, text=True, env=allocator.environment() if lean_malloc else None)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT ") :])


def machine() -> str:
    import torch

    from peftgen.precision import cpu_has_fast_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    features = [f for f in ("amx_tile", "avx512_bf16") if f in flags]
    gpu = f"GPU {torch.cuda.get_device_name()} (peak memory: allocated on the GPU), " if torch.cuda.is_available() else ""
    return (
        f"{gpu}{cpu}, {os.cpu_count()} cores ({', '.join(features) or 'no AMX/AVX512-BF16'}; fast bf16: {cpu_has_fast_bf16()}), "
        f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2,smollm2", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    parser.add_argument("--ablations", action="store_true", help="also run each technique switched off (first shape only)")
    parser.add_argument("--ablation", action="append", default=[], help="also run this one ablation row (repeatable; first shape only)")
    parser.add_argument("--no-memory", action="store_true", help="skip the 512-token memory rows")
    parser.add_argument("--epochs", type=int, default=1, help="whole epochs of each speed run (default 1; a GPU needs more to time)")
    parser.add_argument("--repeats", type=int, default=1, help="speed runs per row, in rounds of every row; the median is shown, all rates after it")
    parser.add_argument("--pieces", type=int, default=24, help="training pieces of the speed runs (default 24: 12 steps of batch 2)")
    parser.add_argument("--piece-tokens", type=int, default=512, help="the most tokens of a training piece, 64 to 512 (default 512)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 6 training pieces: a smoke test of this script")
    parser.add_argument("--work", default=None, help="folder for models, data and runs (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--profile", action="store_true", help="only: where one step's time goes, before and after")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="peftgen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        benchmark(args, parser, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def benchmark(args, parser, work: Path) -> None:
    shapes = ["tiny"] if args.quick else args.shapes.split(",")
    rows = [(row, row, {}) for row in args.rows.split(",")]
    if min(args.epochs, args.repeats, args.pieces) < 1:
        parser.error(f"--epochs, --repeats and --pieces take a whole number of at least 1, got {args.epochs}, {args.repeats} and {args.pieces}")
    if not 64 <= args.piece_tokens <= 512:
        parser.error(f"--piece-tokens takes 64 to 512 (the memory rows' examples are 512 tokens), got {args.piece_tokens}")
    unknown = [name for name in args.ablation if name not in ABLATIONS]
    if unknown:
        parser.error(f"unknown ablation {unknown[0]!r}; the ablations are: {', '.join(ABLATIONS)}")
    rows += [(name, mode, overrides) for name, (mode, overrides) in ABLATIONS.items() if args.ablations or name in args.ablation]
    files = build_data(work, 6 if args.quick else args.pieces, 4 if args.quick else 8, args.piece_tokens)
    print(f"machine: {machine()}")
    if args.profile:
        if "GPU" in machine():
            parser.error("--profile times CPU steps (bf16 autocast on the CPU)")
        return profile_step(build_model(shapes[0], work / f"model-{shapes[0]}"), files)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (rows are timed one after another; a busy machine skews them)")
    rates = machine_rates()
    print(f"this machine's products ({' x '.join(map(str, PRODUCT))}): bf16 {rates['bfloat16']:.2f} TFLOP/s, fp32 {rates['float32']:.2f}")
    results = []
    for shape in shapes:
        model_dir = build_model(shape, work / f"model-{shape}")
        parameters = parameter_count(model_dir)
        bound = matmul_rates.bound_tokens_per_second(parameters, rates["bfloat16"])
        pieces = f"pieces of up to {args.piece_tokens} tokens"
        print(f"\n{SHAPES[shape][0]}: batch {BATCH}, {pieces}, {args.epochs:g} epoch(s); memory: 3 steps of {BATCH} x 512 tokens")
        print(f"full fine-tuning's 6 FLOPs per parameter per token ({parameters / 1e6:.0f}M parameters) at the bf16 rate: at most {bound:.0f} tokens/s")
        print(f"{'row':34} {'label tok/s':>11} {'vs recipe':>9} {'saving':>6} {'train loss':>10} {'valid loss':>10} {'peak GB':>8} {'vs full':>7}  all runs")
        table = {}
        shape_rows = [(name, row, overrides) for name, row, overrides in rows if shape == shapes[0] or not overrides]
        # Round after round, every row once per round: the machine's drift over
        # the run falls on all rows alike instead of on whichever ran last.
        speeds = {name: [] for name, _, _ in shape_rows}
        for round_ in range(args.repeats):
            for name, row, overrides in shape_rows:
                speeds[name].append(run_row(name, row, overrides, model_dir, files, work, False, args.epochs))
            if args.repeats > 1:
                so_far = ", ".join(f"{n} {'failed' if 'error' in r[-1] else round(rate_of(r[-1]))}" for n, r in speeds.items())
                print(f"round {round_ + 1} of {args.repeats}: {so_far}", flush=True)
        for name, row, overrides in shape_rows:
            speed = median_run(speeds[name])
            memory = {} if args.no_memory else run_row(name, row, overrides, model_dir, files, work, True, args.epochs)
            entry = {"shape": shape, "row": name, "speed": speed, "memory": memory}
            table[name] = entry
            results.append(entry)
            print(format_row(name, entry, table), flush=True)
        print(summary(table))
        if args.repeats > 1:
            print(round_by_round(speeds))
        print(against_the_bound(table, bound))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "products_tflops": rates, "results": results}, indent=2), encoding="utf-8")


PRODUCT = (1024, 768, 3072)  # a GPT-2 small MLP product at 2 x 512 tokens


def machine_rates() -> dict[str, float]:
    """TFLOP/s of this machine's bf16 and fp32 products at PRODUCT's shape (on the GPU where there is one)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {dtype: matmul_rates.product_rate(dtype, device, PRODUCT) for dtype in ("bfloat16", "float32")}


def parameter_count(model_dir: Path) -> int:
    """Parameters of the model in model_dir, a tied matrix counted once; built on the meta device, nothing loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def against_the_bound(table: dict, bound: float) -> str:
    """full's rate, and 3x the recipe's, as shares of what this machine's bf16 products allow."""
    full, recipe = table.get("full", {}).get("tokens_per_s"), table.get("recipe", {}).get("tokens_per_s")
    if not full or not recipe:
        return ""
    return (
        f"against this machine's products: full runs at {full / bound:.0%} of the bf16 products' bound; 3x the recipe would be {3 * recipe / bound:.0%} of it"
    )


def rate_of(run: dict) -> float:
    """Label tokens per second of the training loop."""
    return run["label_tokens"] / run["loop"]


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s; every run's rate kept, so the spread shows."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    good.sort(key=rate_of)
    middle = dict(good[len(good) // 2])
    middle["rates"] = [round(rate_of(r)) for r in good]
    return middle


RATIOS = (("full", "recipe", "3x"), ("lora", "full", "1.4x"), ("8bit", "recipe", "1x"))  # the targets' speed ratios


def summary(table: dict) -> str:
    """The table against the issue's targets, as ratios within this one run."""

    def rate(row):
        return table.get(row, {}).get("tokens_per_s")

    def peak(row):
        return peak_of(table.get(row, {}).get("memory"))

    parts = []
    for index, (row, anchor, target) in enumerate(RATIOS):
        if rate(row) and rate(anchor):
            against = "the recipe" if anchor == "recipe" else anchor
            parts.append(f"{row} {rate(row) / rate(anchor):.2f}x {against} ({'target ' if index == 0 else ''}{target})")
    if peak("full") and peak("trainer-bf16"):
        parts.append(f"full's memory {peak('full') / peak('trainer-bf16'):.0%} of trainer-bf16's (80%)")
    for row, target in (("lora", "50%"), ("8bit", "35%")):
        if peak(row) and peak("full"):
            parts.append(f"{row}'s memory {peak(row) / peak('full'):.0%} of full's ({target})")
    return "against the targets: " + "; ".join(parts) if parts else ""


def round_by_round(speeds: dict[str, list[dict]]) -> str:
    """The targets' speed ratios within each round, and their medians.

    The rows of one round run minutes apart, the rounds further apart; each
    round's own ratio shows how far the ratio moves from round to round,
    which the ratio of the two rows' medians hides. A round where either row
    failed is left out.
    """
    parts = []
    for row, anchor, target in RATIOS:
        pairs = zip(speeds.get(row, []), speeds.get(anchor, []))
        ratios = [rate_of(a) / rate_of(b) for a, b in pairs if "error" not in a and "error" not in b]
        if ratios:
            each = " ".join(f"{r:.2f}x" for r in ratios)
            parts.append(f"{row} over {anchor} {each} (median {statistics.median(ratios):.2f}x; target {target})")
    return "within each round: " + "; ".join(parts) if parts else ""


def format_row(name: str, entry: dict, table: dict) -> str:
    speed, memory = entry["speed"], entry["memory"]
    if "error" in speed:
        return f"{name:34} failed: {speed['error'][:200]}"
    rate = rate_of(speed)
    entry["tokens_per_s"] = rate
    recipe = table.get("recipe", {}).get("tokens_per_s")
    ratio = f"{rate / recipe:8.2f}x" if recipe else f"{'':9}"
    peak = peak_of(memory)
    full_peak = peak_of(table.get("full", {}).get("memory"))
    vs_full = f"{peak / full_peak:6.0%}" if peak and full_peak else f"{'':7}"
    peak_text = f"{peak:8.2f}" if peak else f"{'-':>8}"
    spread = "/".join(str(r) for r in speed.get("rates", [])) if len(speed.get("rates", [])) > 1 else ""
    saving = speed["runtime"] - speed["loop"]
    return (
        f"{name:34} {rate:11.0f} {ratio} {saving:6.1f} {speed['train_loss']:10.4f} {speed.get('valid_loss', float('nan')):10.4f} "
        f"{peak_text} {vs_full}  {spread}"
    )


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    if "--child" not in sys.argv:
        print(f"\n{time.perf_counter() - started:.0f} s in all")
