"""The sparsifier registry: ``SPARSIFIERS`` (name -> instance) and :func:`get_sparsifier`.

Sparsifier modules register an instance with ``@SPARSIFIERS.register("name")`` on their class;
importing :mod:`evomerge_opt.merge.sparsify` imports every built-in one, so a lookup through this
module always sees them. ``config.names.SPARSIFIER_NAMES`` lists the same names for torch-free
validation (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable

from evomerge_opt.merge._base import Sparsifier
from evomerge_opt.registry import Registry

SPARSIFIERS: Registry[Sparsifier] = Registry("sparsifier")


def register(name: str) -> Callable[[type[Sparsifier]], type[Sparsifier]]:
    """Class decorator: register one instance of the sparsifier class under ``name``."""

    def decorate(cls: type[Sparsifier]) -> type[Sparsifier]:
        SPARSIFIERS.add(name, cls())
        return cls

    return decorate


def get_sparsifier(name: str) -> Sparsifier:
    """The registered sparsifier ``name`` (unknown -> error listing the valid ones)."""
    return SPARSIFIERS.get(name)
