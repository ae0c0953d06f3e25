"""Dynamic size options (``--hidden-size``, ``--sliding-window``, ...) derived from :class:`ModelConfigSpec`.

One option per field of the spec, so a field added to the spec shows up in ``evo-merge model --help``
without touching the CLI. The values override the model config YAML given with ``--config``.
``dtype`` is left out: the model-level ``--dtype`` option sets it.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass
from typing import Any

from evomerge_opt.config.model_config import ModelConfigSpec
from evomerge_opt.errors import ConfigError

# Fields that have their own model-level option (or none at all).
EXCLUDED_FIELDS = frozenset({"dtype"})

HELP: dict[str, str] = {
    "architecture": "Model architecture",
    "vocab_size": "Vocabulary size (rows of the token embedding)",
    "hidden_size": "Model hidden dimension size (d_model)",
    "intermediate_size": "Feedforward dimension",
    "num_hidden_layers": "Number of hidden layers",
    "num_attention_heads": "Number of query heads (and KV heads, if otherwise unspecified)",
    "num_key_value_heads": "Number of Key/Value heads (< heads gives grouped-query attention)",
    "head_dim": "Dimension of one attention head (default hidden_size / num_attention_heads)",
    "max_position_embeddings": "Maximum sequence length",
    "rms_norm_eps": "RMS Norm eps",
    "rope_theta": "RoPE base frequency",
    "tie_word_embeddings": "Tie input and output word embeddings",
    "sliding_window": "Sliding window size (Mistral). 'null' for disabled",
    "bos_token_id": "Beginning-of-sequence token id ('null' for none)",
    "eos_token_id": "End-of-sequence token id ('null' for none)",
    "pad_token_id": "Padding token id ('null' for none)",
    "tokenizer": "Tokenizer (HF tokenizer/model dir or zoo:NAME) saved beside the model",
}

_NULLS = {"null", "none", "~", ""}


@dataclass(frozen=True)
class SizeOption:
    """One dynamic option: the spec field it sets and how its text is parsed."""

    field: str
    flag: str
    kind: type  # int | float | bool | str
    nullable: bool
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return f"spec_{self.field}"

    def parse(self, text: str) -> Any:
        if self.nullable and text.strip().lower() in _NULLS:
            return None
        try:
            return self.kind(text)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(self.kind, "a string")
            raise argparse.ArgumentTypeError(
                f"{self.flag} takes {what}{' or null' if self.nullable else ''}, but got {text!r}"
            ) from None


def _field_type(annotation: Any) -> tuple[type, bool, tuple[str, ...] | None]:
    """``int | None`` -> (int, True, None); ``Literal['a','b']`` -> (str, False, ('a','b'))."""
    nullable = False
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        nullable = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported field type {annotation!r}")
        annotation = rest[0]
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return str, nullable, tuple(str(a) for a in args)
    if annotation in (int, float, bool, str):
        return annotation, nullable, None
    raise TypeError(f"unsupported field type {annotation!r}")


def size_options() -> list[SizeOption]:
    """One :class:`SizeOption` per field of :class:`ModelConfigSpec` (minus ``dtype``), in field order."""
    options = []
    for name, info in ModelConfigSpec.model_fields.items():
        if name in EXCLUDED_FIELDS:
            continue
        kind, nullable, choices = _field_type(info.annotation)
        options.append(SizeOption(name, "--" + name.replace("_", "-"), kind, nullable, choices))
    return options


class _Unset:
    """Default of every dynamic option: argparse cannot tell "not given" from "given as null" with None."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def add_size_arguments(parser: argparse.ArgumentParser | Any, default: Any = UNSET) -> None:
    """Add the dynamic options to ``parser`` (an argument group is fine); unset ones stay ``default``."""
    for option in size_options():
        field = ModelConfigSpec.model_fields[option.field]
        help_text = HELP.get(option.field, f"ModelConfigSpec.{option.field}")
        help_text += f" (config default: {field.default})"
        if option.kind is bool:
            parser.add_argument(
                option.flag, dest=option.dest, action=argparse.BooleanOptionalAction, default=default,
                help=help_text,
            )
        elif option.choices:
            parser.add_argument(option.flag, dest=option.dest, choices=option.choices, default=default,
                                help=help_text)
        else:
            parser.add_argument(
                option.flag, dest=option.dest, type=option.parse, default=default,
                metavar=option.field.upper(), help=help_text,
            )


def size_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` for every dynamic option given on the command line (``null`` included)."""
    overrides = {}
    for option in size_options():
        value = getattr(args, option.dest, UNSET)
        if value is not UNSET:
            overrides[option.field] = value
    return overrides


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], source: str) -> ModelConfigSpec:
    """The spec of ``data`` (a model config mapping) with ``overrides`` applied, validated as a whole."""
    merged = dict(data)
    merged.update(overrides)
    if "dtype" in merged and merged["dtype"] is None:
        raise ConfigError(f"{source}: `dtype` must be a dtype name such as float32, but got null.")
    return ModelConfigSpec.from_yaml_dict(merged, source=source)
