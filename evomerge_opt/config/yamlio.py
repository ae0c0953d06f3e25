"""YAML in and out: ``yaml.safe_load`` only, writes are atomic (temp file + ``os.replace``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from evomerge_opt.errors import ConfigError, ModelSourceError
from evomerge_opt.io.atomic import atomic_write_text


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file with the safe loader; a missing or malformed file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"YAML file {str(path)!r} does not exist; check the path.")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {exc}") from exc


def dump_yaml(data: Any) -> str:
    """Serialise plain data (dicts, lists, scalars) as block-style YAML, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True, width=120)


def save_yaml(data: Any, path: str | os.PathLike[str], header: str | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; ``header`` lines are written as ``#`` comments first."""
    text = dump_yaml(data)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return atomic_write_text(path, text)
