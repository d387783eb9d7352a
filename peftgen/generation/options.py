"""Decoder options: the typed keyword arguments of a decoder's ``__init__``.

    peftgen generate --decoder topp -o p=0.95 -o temperature=0.7

``-o`` values arrive as strings and are converted by the parameter's
annotation: int, float, bool, str, ``Literal[...]`` and unions of those (tried
left to right, so ``bool | Literal["never"]`` takes ``true`` or ``never``).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from peftgen.config import short
from peftgen.errors import PeftgenError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


@dataclass(frozen=True)
class Option:
    name: str
    annotation: Any
    default: Any  # inspect.Parameter.empty when the option is required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def type_label(self) -> str:
        return type_label(self.annotation)

    def describe(self) -> str:
        """'k (int, default 50)', as error messages and ``peftgen decoders`` show it."""
        default = "required" if self.required else f"default {self.default!r}"
        return f"{self.name} ({self.type_label}, {default})"


def decoder_options(cls: type) -> list[Option]:
    """The options of a decoder class, in signature order."""
    signature = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that cannot be evaluated: fall back to the raw one
        hints = {}
    options = []
    for parameter in list(signature.parameters.values())[1:]:  # skip self
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = hints.get(parameter.name, parameter.annotation)
        if annotation is inspect.Parameter.empty or isinstance(annotation, str):
            default = parameter.default
            annotation = type(default) if default not in (inspect.Parameter.empty, None) else str
        options.append(Option(parameter.name, annotation, parameter.default))
    return options


def type_label(annotation: Any) -> str:
    if _is_union(annotation):
        return " | ".join(type_label(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def convert(text: str, annotation: Any) -> Any:
    """Convert one ``-o`` string by its annotation; ValueError says what was expected."""
    if _is_union(annotation):
        for member in typing.get_args(annotation):
            try:
                return convert(text, member)
            except ValueError:
                continue
        raise ValueError(f"expected {type_label(annotation)}")
    if typing.get_origin(annotation) is Literal:
        for choice in typing.get_args(annotation):
            if text == str(choice) or (isinstance(choice, bool) and text.lower() == str(choice).lower()):
                return choice
        raise ValueError(f"expected one of {type_label(annotation)}")
    if annotation is type(None):
        if text.lower() in _NONE:
            return None
        raise ValueError("expected None")
    if annotation is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected a bool (true/false)")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"expected {'an int' if annotation is int else 'a float'}") from None
    if annotation in (str, Any):
        return text
    return annotation(text)  # any other callable type, e.g. a user's enum


def parse_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``["k=5", "temperature=0.7"]`` from repeated ``-o`` flags into a dict."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PeftgenError(f"-o expects key=value, got {short(pair)}. Example: -o temperature=0.7")
        if key in options:
            raise PeftgenError(f"-o {short(key)[1:-1]} is given twice ({short(options[key])} and {short(value)}). Give it once.")
        options[key] = value
    return options


def build_decoder(cls: type, given: Mapping[str, Any] | None = None):
    """An instance of decoder ``cls`` from user options (strings are converted).

    Unknown options, unconvertible values and ValueErrors raised by the
    decoder's ``__init__`` become a PeftgenError naming the decoder and listing
    its options.
    """
    given = dict(given or {})
    options = {option.name: option for option in decoder_options(cls)}
    listing = _listing(cls, options.values())
    unknown = [key for key in given if key not in options]
    if unknown:
        raise PeftgenError(f"Decoder '{cls.name}' has no option '{unknown[0]}'. {listing}")
    for option in options.values():
        if option.required and option.name not in given:
            raise PeftgenError(f"Decoder '{cls.name}' needs option '{option.name}' (-o {option.name}=...). {listing}")
    kwargs = {}
    for key, value in given.items():
        if isinstance(value, str):
            try:
                value = convert(value, options[key].annotation)
            except (ValueError, TypeError, ArithmeticError) as error:  # a plugin's own converter may raise any of these
                raise PeftgenError(f"Option {key}={short(value)} of decoder '{cls.name}': {error}. {listing}") from None
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        raise PeftgenError(f"Decoder '{cls.name}' rejected its options: {error}. {listing}") from None
    except PeftgenError:
        raise
    except Exception as error:
        raise PeftgenError(f"Decoder '{cls.name}' failed in __init__(): {type(error).__name__}: {error}. {listing}") from None


def resolved_options(decoder) -> dict[str, Any]:
    """Every option of a decoder instance with the value it runs with (defaults included)."""
    return {option.name: getattr(decoder, option.name, option.default) for option in decoder_options(type(decoder))}


def _listing(cls: type, options) -> str:
    options = list(options)
    if not options:
        return f"'{cls.name}' takes no options."
    return "Its options: " + ", ".join(option.describe() for option in options) + "."


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)
