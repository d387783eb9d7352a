"""``peftgen compare``: every decoder on the same prompts and seeds, one row each.

peftgen compare --model runs/lora --num-samples 20 -o beam.num_beams=3 --plot decoders.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftgen.cli.plugins import PluginFlag, load_decoders

Opt = typer.Option


def compare(
    model: Annotated[str, Opt(help="Run folder, model folder, .gguf file or Hub id.")],
    decoders: Annotated[str, Opt(help="'all' (every loaded decoder) or names, e.g. greedy,topk,beam.")] = "all",
    option: Annotated[
        Optional[list[str]], Opt("--option", "-o", help="Option of one decoder, decoder.key=value, e.g. -o beam.num_beams=3; repeatable.")
    ] = None,
    prompt: Annotated[
        Optional[list[str]], Opt(help="Text to continue; repeatable, used in turn. Default: the tokenizer's bos, <BOS> for a trained run.")
    ] = None,
    num_samples: Annotated[int, Opt(help="Samples per decoder.")] = 20,
    max_new_tokens: Annotated[
        Optional[int], Opt("--max-new-tokens", "--length", help="Most tokens per sample. Default: 300, fewer if the model's context is shorter.")
    ] = None,
    seed: Annotated[int, Opt(help="Seed of every decoder's random draws: the same seed gives the same table (speed aside).")] = 0,
    judge: Annotated[Optional[str], Opt(help="Another model (folder, .gguf, Hub id) to score the samples' perplexity with.")] = None,
    batch_size: Annotated[int, Opt(help="Samples generated together.")] = 8,
    json_output: Annotated[bool, Opt("--json", help="One JSON object per decoder and line: every measurement, options, error.")] = False,
    plot: Annotated[Optional[Path], Opt(help="Also draw the measurements side by side into this PNG.")] = None,
    plugin: PluginFlag = None,
) -> None:
    """Compare decoders: speed, <EOS> rate, length, diversity and likelihood of their samples."""
    from peftgen import compare as compare_lib
    from peftgen.generation import parse_pairs

    available = load_decoders(plugin)  # plugin warnings go to stderr here
    names = compare_lib.select_decoders(decoders, available)
    options = compare_lib.decoder_options(parse_pairs(option), names)
    rows = compare_lib.compare(
        model,
        decoders=names,
        options=options,
        prompts=prompt,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        judge=judge,  # plugins: loaded above
        progress=lambda line: typer.echo(line, err=True),
    )
    for row in rows:
        if row.error:
            typer.echo(f"Warning: decoder '{row.decoder}' failed: {row.error}", err=True)
    if json_output:
        for row in rows:
            typer.echo(json.dumps(row.to_dict(), ensure_ascii=False))
    else:
        typer.echo(compare_lib.table(rows))
    if plot is not None:
        compare_lib.plot(rows, plot)
        typer.echo(f"Plot: {plot}", err=True)
