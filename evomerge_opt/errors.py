"""Exceptions raised for bad input.

Every message states the rule that was broken, the offending value and, where there is one, the fix,
in the style of ``ValueError(f"`low <= high` must hold, but got ({low=}, {high=}).")``.
All of them derive from :class:`EvoMergeError` (a ``ValueError``) so the CLI can turn them into a
clear message and a non-zero exit code without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class EvoMergeError(ValueError):
    """Base class of every user-facing error in evo-merge."""


class ConfigError(EvoMergeError):
    """A YAML config, recipe or search space breaks a rule.

    ``problems`` holds every problem found, so ``evo-merge validate`` can report them all at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems) if problems else [message]
        super().__init__(message if problems is None else message + "\n  - " + "\n  - ".join(self.problems))


class ModelSourceError(EvoMergeError):
    """A model, adapter, tokenizer or dataset could not be found or opened."""


class ShapeMismatchError(EvoMergeError):
    """Source models disagree on a tensor's shape, a tensor is missing, or architectures differ."""


class NonFiniteResultError(EvoMergeError):
    """A merge produced NaN or inf values."""


class UnknownNameError(EvoMergeError, KeyError):
    """A name looked up in a registry (merge method, sparsifier, sampler...) does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


def validation_problems(exc: Any, valid_keys: Iterable[str] | None = None, top: str = "(top level)") -> list[str]:
    """One ``"loc: message"`` line per error of a pydantic ``ValidationError``.

    Unknown keys say so (listing ``valid_keys`` when given) and missing keys read as such, so every
    schema in the package reports problems the same way.
    """
    problems = []
    for err in exc.errors():
        loc = ".".join(map(str, err["loc"])) or top
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + (f"; valid keys are: {', '.join(valid_keys)}" if valid_keys else "")
        elif err["type"] == "missing":
            msg = "required key is missing"
        problems.append(f"{loc}: {msg}")
    return problems
