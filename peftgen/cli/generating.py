"""``peftgen generate`` and ``peftgen decoders``.

    peftgen generate --model runs/lora --decoder topk -o k=50 --length 300 --num-return-sequences 5
    peftgen decoders --json
"""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftgen.errors import PeftgenError

Opt = typer.Option
DEFAULT_NEW_TOKENS = 300  # the article's --length
PluginFlag = Annotated[
    Optional[list[str]],
    Opt("--plugin", help="A plugin module name or .py file to load as well; repeatable. Also: PEFTGEN_PLUGINS."),
]


def generate(
    model: Annotated[str, Opt(help="Run folder, model folder, .gguf file or Hub id.")],
    decoder: Annotated[str, Opt(help="Decoding strategy; 'peftgen decoders' lists them.")] = "topk",
    prompt: Annotated[Optional[list[str]], Opt(help="Text to continue; repeatable. Default: the tokenizer's bos, <BOS> for a trained run.")] = None,
    prompt_file: Annotated[Optional[Path], Opt(help="A file of prompts, one per line.")] = None,
    max_new_tokens: Annotated[Optional[int], Opt("--max-new-tokens", "--length", help=f"Most tokens to generate per sequence. Default: {DEFAULT_NEW_TOKENS}, fewer if the model's context is shorter.")] = None,
    num_return_sequences: Annotated[int, Opt(help="Sequences per prompt.")] = 1,
    stop_token: Annotated[Optional[list[str]], Opt(help="Token that ends a sequence; repeatable. Default: the tokenizer's eos, <EOS> for a trained run.")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed of the decoder's random draws; the same seed repeats a run. Default: random, printed to stderr.")] = None,
    option: Annotated[Optional[list[str]], Opt("--option", "-o", help="Decoder option key=value, e.g. -o k=40 -o temperature=0.7; repeatable.")] = None,
    json_output: Annotated[bool, Opt("--json", help="One JSON object per sequence and line: prompt, text, token_ids, finish_reason, decoder, options, seed.")] = False,
    batch_size: Annotated[int, Opt(help="Prompts generated together.")] = 8,
    plugin: PluginFlag = None,
) -> None:
    """Generate text with a decoding strategy; generation stops at a stop token."""
    from peftgen.generation import build_decoder, check_request, generate as run, parse_pairs, resolved_options
    from peftgen.generation.decoder import TokenDecoder
    from peftgen.generation.engine import context_length
    from peftgen.generation.text import Streamer, completion_text, default_prompt, encode_prompt, stop_token_ids

    from peftgen.config import MAX_BATCH, SEED_LIMIT
    from peftgen.plugins import get_decoder

    info = get_decoder(decoder, _decoders(plugin))
    strategy = build_decoder(info.cls, parse_pairs(option))
    check_request(strategy, num_return_sequences, DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens)
    for flag, value in (("--batch-size", batch_size), ("--num-return-sequences", num_return_sequences)):
        if not 1 <= value <= MAX_BATCH:
            raise PeftgenError(f"{flag} must be between 1 and {MAX_BATCH}, got {value}.")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise PeftgenError(f"--seed must be between 0 and {SEED_LIMIT - 1}, got {seed}.")
    texts = _prompts(prompt, prompt_file)

    from peftgen import model as model_lib

    lm, tokenizer = model_lib.load(model)
    texts = texts or [default_prompt(tokenizer)]
    prompts = [encode_prompt(tokenizer, text) for text in texts]
    stops = stop_token_ids(tokenizer, stop_token)
    if max_new_tokens is None:  # not given: the article's 300, or what the context leaves room for
        room = (context_length(lm) or 10**9) - max(map(len, prompts))
        max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, room))
    given_seed = seed is not None
    seed = seed if given_seed else random.randrange(2**31)
    options = resolved_options(strategy)
    stream = not json_output and len(texts) * num_return_sequences == 1 and isinstance(strategy, TokenDecoder)
    streamer = Streamer(tokenizer, stops) if stream else None
    on_token = (lambda step, tokens: typer.echo(streamer.push(int(tokens[0])), nl=False)) if stream else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]

    number = 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        results = run(
            lm, prompts[start : start + batch_size], strategy, max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences, stop_tokens=stops, pad_token_id=pad, seed=seed + start,
            on_token=on_token,
        )
        for text, completions in zip(chunk, results):
            for completion in completions:
                number += 1
                output = completion_text(tokenizer, completion)
                if json_output:
                    typer.echo(json.dumps({
                        "prompt": text, "text": output, "token_ids": completion.token_ids,
                        "finish_reason": completion.finish_reason, "decoder": decoder, "options": options, "seed": seed,
                    }, ensure_ascii=False))
                elif stream:
                    typer.echo("")
                else:
                    typer.echo(f"=== sequence {number} · prompt {text!r} · {completion.finish_reason} ===")
                    typer.echo(output)
    if not given_seed and not json_output:
        typer.echo(f"(seed {seed}: pass --seed {seed} to repeat this output)", err=True)


def decoders(
    json_output: Annotated[bool, Opt("--json", help="Print a JSON list: name, plugin, source, kind, description, options.")] = False,
    plugin: PluginFlag = None,
) -> None:
    """List the decoders of every loaded plugin, with their options."""
    from peftgen.generation import SequenceDecoder, decoder_options

    listing = []
    for name, info in sorted(_decoders(plugin).items()):
        options = [
            {"name": o.name, "type": o.type_label, "default": None if o.required else _jsonable(o.default), "required": o.required}
            for o in decoder_options(info.cls)
        ]
        kind = "sequence" if issubclass(info.cls, SequenceDecoder) else "token"
        listing.append({"name": name, "plugin": info.plugin, "source": info.source, "kind": kind,
                        "description": _doc(info.cls), "options": options})
    if json_output:
        typer.echo(json.dumps(listing, indent=2, ensure_ascii=False))
        return
    for entry in listing:
        typer.echo(f"{entry['name']}  (plugin {entry['plugin']}, {entry['source']})")
        for line in entry["description"].splitlines():
            typer.echo(f"    {line}".rstrip())
        for o in entry["options"]:
            default = "required" if o["required"] else f"default {o['default']!r}"
            typer.echo(f"    -o {o['name']}=<{o['type']}>  {default}")
        typer.echo("")


def _decoders(extra: list[str] | None):
    """Load plugins (built-ins, installed, PEFTGEN_PLUGINS, --plugin); plugin warnings go to stderr."""
    from peftgen import plugins

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", plugins.PluginWarning)
        plugins.load_plugins(extra or [])
        found = plugins.get_decoders()
    for warning in caught:
        if issubclass(warning.category, plugins.PluginWarning):
            typer.echo(f"Warning: {warning.message}", err=True)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return found


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


def _doc(cls) -> str:
    import inspect

    return inspect.cleandoc(cls.__doc__ or "")


def _jsonable(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
