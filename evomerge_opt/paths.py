"""Where evo-merge keeps things on disk (caches, the pico zoo). Overridable by environment variables."""

from __future__ import annotations

import os
from pathlib import Path


def evomerge_home() -> Path:
    """Root of evo-merge's caches: ``$EVOMERGE_HOME``, else ``~/.cache/evomerge``."""
    return Path(os.environ.get("EVOMERGE_HOME", Path.home() / ".cache" / "evomerge")).expanduser()


def cache_dir(kind: str) -> Path:
    """A cache sub-directory such as ``windows``, ``hessians`` or ``task_vectors``."""
    return evomerge_home() / "cache" / kind


def zoo_root() -> Path:
    """Directory of the default pico zoo: ``$EVOMERGE_ZOO``, else ``<evomerge_home>/zoo``."""
    return Path(os.environ.get("EVOMERGE_ZOO", evomerge_home() / "zoo")).expanduser()
