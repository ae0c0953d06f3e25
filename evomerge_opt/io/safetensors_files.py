"""A model directory's safetensors files and their headers, without torch (and without reading data).

The safetensors format is a little-endian u64 header length, a JSON header
``{name: {dtype, shape, data_offsets}}`` and the raw bytes. :func:`weight_files` lists a directory's
weight files (single file, sharded with an index, or any ``*.safetensors``); :func:`read_header` gives
every tensor's dtype code, shape and absolute byte range. :mod:`evomerge_opt.io.checkpoint` builds its
torch readers on these; the ``apply`` pre-pass uses them before torch is imported.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge_opt.errors import ModelSourceError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class RawTensorInfo:
    """Where a tensor lives: ``file`` and absolute byte range ``[start, end)``; ``dtype`` is the
    safetensors code (``"BF16"``, ``"F32"``, ...)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_config(model_dir: Path) -> dict[str, Any]:
    file = model_dir / "config.json"
    if not file.is_file():
        raise ModelSourceError(f"{str(model_dir)!r} has no config.json; it is not a Hugging Face model directory.")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{str(file)!r} is not valid JSON: {exc}") from exc


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (``text_config`` of multimodal models, else the config)."""
    return config.get("text_config") or config


def weight_files(directory: Path) -> list[Path]:
    """The directory's safetensors weight files (the index's shards, else model.safetensors, else all)."""
    index_file = directory / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelSourceError(f"{str(index_file)!r} is not a valid safetensors index: {exc}") from exc
        names = list(dict.fromkeys(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        names = sorted(p.name for p in directory.glob("*.safetensors"))
        if not names:
            raise ModelSourceError(
                f"{str(directory)!r} holds no *.safetensors weights (model.safetensors or an index); "
                "convert the checkpoint to safetensors first."
            )
    files = [directory / name for name in names]
    for file in files:
        if not file.is_file():
            raise ModelSourceError(f"Shard {file.name!r} listed in {str(directory)!r}'s index is missing.")
    return files


def read_header(file: Path) -> tuple[dict[str, RawTensorInfo], dict[str, str]]:
    """Parse a ``.safetensors`` header: name -> :class:`RawTensorInfo` (file order) and ``__metadata__``."""
    try:
        with open(file, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise ModelSourceError(f"{str(file)!r} is not a safetensors file (shorter than 8 bytes).")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > 100_000_000:
                raise ModelSourceError(f"{str(file)!r} is not a safetensors file (header of {header_len} bytes).")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise ModelSourceError(f"Cannot read checkpoint file {str(file)!r}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{str(file)!r} has a corrupt safetensors header: {exc}") from exc
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    infos: dict[str, RawTensorInfo] = {}
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        start, end = entry["data_offsets"]
        infos[name] = RawTensorInfo(file, entry["dtype"], tuple(entry["shape"]), data_start + start, data_start + end)
    return infos, metadata


def read_index(directory: Path) -> dict[str, RawTensorInfo]:
    """Every tensor of a model directory: name -> :class:`RawTensorInfo` (over all its weight files)."""
    index: dict[str, RawTensorInfo] = {}
    for file in weight_files(directory):
        index.update(read_header(file)[0])
    return index
