"""``peftgen generate``: text from prompts, with any decoder.

peftgen generate --model runs/lora --decoder topk -o k=50 --length 300 --num-return-sequences 5
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftgen.cli.plugins import PluginFlag, load_decoders
from peftgen.errors import PeftgenError
from peftgen.text_generation import DEFAULT_NEW_TOKENS

Opt = typer.Option


def generate(
    model: Annotated[str, Opt(help="Run folder, model folder, .gguf file or Hub id.")],
    decoder: Annotated[str, Opt(help="Decoding strategy; 'peftgen decoders' lists them.")] = "topk",
    prompt: Annotated[Optional[list[str]], Opt(help="Text to continue; repeatable. Default: the tokenizer's bos, <BOS> for a trained run.")] = None,
    prompt_file: Annotated[Optional[Path], Opt(help="A file of prompts, one per line.")] = None,
    max_new_tokens: Annotated[
        Optional[int],
        Opt(
            "--max-new-tokens",
            "--length",
            help=(f"Most tokens to generate per sequence. Default: {DEFAULT_NEW_TOKENS}, fewer if the model's context is shorter."),
        ),
    ] = None,
    num_return_sequences: Annotated[int, Opt(help="Sequences per prompt.")] = 1,
    stop_token: Annotated[
        Optional[list[str]], Opt(help="Token that ends a sequence; repeatable. Default: the tokenizer's eos, <EOS> for a trained run.")
    ] = None,
    seed: Annotated[Optional[int], Opt(help="Seed of the decoder's random draws; the same seed repeats a run. Default: random, printed to stderr.")] = None,
    option: Annotated[Optional[list[str]], Opt("--option", "-o", help="Decoder option key=value, e.g. -o k=40 -o temperature=0.7; repeatable.")] = None,
    json_output: Annotated[
        bool, Opt("--json", help="One JSON object per sequence and line: prompt, text, token_ids, finish_reason, decoder, options, seed.")
    ] = False,
    batch_size: Annotated[int, Opt(help="Prompts generated together.")] = 8,
    plugin: PluginFlag = None,
) -> None:
    """Generate text with a decoding strategy; generation stops at a stop token."""
    from peftgen.generation import parse_pairs
    from peftgen.plugins import get_decoder
    from peftgen.text_generation import generate_text

    info = get_decoder(decoder, load_decoders(plugin))
    options = parse_pairs(option)
    prompts = _prompts(prompt, prompt_file)
    streamed = []  # a single sequence of a token decoder is printed as it comes

    def show(piece: str) -> None:
        streamed.append(piece)
        typer.echo(piece, nl=False)

    results = generate_text(
        model,
        prompts,
        decoder=info.cls,
        options=options,
        stop_tokens=stop_token,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        seed=seed,
        batch_size=batch_size,
        on_text=None if json_output else show,
    )
    for number, result in enumerate(results, 1):
        if json_output:
            typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        elif streamed:
            typer.echo("")
        else:
            typer.echo(f"=== sequence {number} · prompt {result.prompt!r} · {result.finish_reason} ===")
            typer.echo(result.text)
    if seed is None and not json_output:
        typer.echo(f"(seed {results[0].seed}: pass --seed {results[0].seed} to repeat this output)", err=True)


def _prompts(prompt: list[str] | None, prompt_file: Path | None) -> list[str]:
    if prompt and prompt_file:
        raise PeftgenError("Pass --prompt or --prompt-file, not both.")
    if prompt_file is None:
        return list(prompt or [])
    from peftgen.data import not_text

    if not prompt_file.is_file():
        raise PeftgenError(f"--prompt-file {prompt_file} does not exist.")
    raw = prompt_file.read_bytes()
    kind = not_text(raw)
    if kind:
        raise PeftgenError(f"--prompt-file {prompt_file} is not text: it is {kind}. Give UTF-8 text, one prompt per line.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise PeftgenError(f"--prompt-file {prompt_file} is not UTF-8 text (byte {error.start}, line {line}). Save it as UTF-8.") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise PeftgenError(f"--prompt-file {prompt_file} has no prompts (one per non-blank line).")
    return lines
