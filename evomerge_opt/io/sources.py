"""Resolve a model reference (``zoo:NAME``, a local path or a hub id) to something loadable."""

from __future__ import annotations

import os
from pathlib import Path

from evomerge_opt.errors import ModelSourceError
from evomerge_opt.paths import zoo_root

ZOO_PREFIX = "zoo:"


def resolve_model_ref(ref: str | os.PathLike[str]) -> str:
    """Return a local path or hub id for ``ref``.

    * ``zoo:NAME`` -> ``<zoo root>/NAME`` (models and data of the pico zoo); it must have been built.
    * an existing local path -> its absolute path.
    * anything else is returned unchanged and treated as a hub id by ``from_pretrained`` (which
      honours ``HF_HUB_OFFLINE``).
    """
    text = os.fspath(ref)
    if text.startswith(ZOO_PREFIX):
        name = text[len(ZOO_PREFIX):].strip("/")
        if not name:
            raise ModelSourceError(f"{text!r} names no zoo entry; use e.g. 'zoo:math'.")
        path = zoo_root() / name
        if not path.exists():
            raise ModelSourceError(
                f"Zoo entry {text!r} not found at {str(path)!r}; build the pico zoo first with "
                "`evo-merge zoo build` (or set EVOMERGE_ZOO to where it was built)."
            )
        return str(path)
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    # A hub id is "name" or "org/name"; anything shaped like a filesystem path must exist.
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelSourceError(f"Model path {text!r} does not exist; check the path.")
    return text


def is_peft_adapter(path: str | os.PathLike[str]) -> bool:
    """A directory holding ``adapter_config.json`` is a PEFT (e.g. LoRA) adapter, not a full model."""
    return (Path(path) / "adapter_config.json").is_file()
