"""The pico model zoo (tiny real models trained offline) and tiny random model families for tests.

``build_zoo(settings=None, root=None, force=False)`` builds (or finds, cached) the zoo; see
:mod:`evomerge_opt.zoo.build` for the layout and :mod:`evomerge_opt.zoo.settings` for the presets.
Imports are lazy so ``import evomerge_opt.zoo.random_models`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ZooSettings", "build_zoo", "preset"]


def __getattr__(name: str) -> Any:
    if name == "build_zoo":
        from evomerge_opt.zoo.build import build_zoo

        return build_zoo
    if name in ("ZooSettings", "preset"):
        from evomerge_opt.zoo import settings

        return getattr(settings, name)
    raise AttributeError(name)
