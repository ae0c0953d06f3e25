"""A tiny name -> object registry shared by every plug-in point.

Used for merge methods, sparsifiers, samplers, pruners and fitness metrics. A duplicate name is refused
(as peft does) and an unknown name is an error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from evomerge_opt.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to plug-ins. ``kind`` names the plug-in point in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("ties")``."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if not name or name != name.strip():
            raise ValueError(f"A {self.kind} name must be a non-empty string without surrounding spaces, but got {name!r}.")
        if name in self._items:
            raise ValueError(
                f"A {self.kind} named {name!r} is already registered ({self._items[name]!r}); names must be unique."
            )
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}; valid {self.kind}s are: {', '.join(sorted(self._items))}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
