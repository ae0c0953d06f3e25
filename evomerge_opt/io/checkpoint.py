"""Lazy checkpoint readers: one tensor at a time from a model directory's safetensors (sharded or not).

``open_checkpoint(path)`` returns a :class:`CheckpointReader` whose index maps every tensor name to
``(file, dtype, shape)`` without reading any tensor data; ``get_tensor(name)`` reads exactly that
tensor's bytes.

Why not ``safe_open``'s mmap: every page of an mmapped file that is touched counts in the process's
resident set until the mapping is closed, so reading three models through mmap makes the peak RSS
the size of all three checkpoints. The safetensors format is a little-endian u64 header length, a
JSON header ``{name: {dtype, shape, data_offsets}}`` and the raw bytes, so we parse the header once
and ``readinto`` each tensor's byte range straight into a fresh torch buffer: one copy, no mmap, and
the memory of a tensor is freed as soon as the merge no longer needs it.

``StateDictReader`` gives the same interface over an in-memory state dict (used for LoRA sources
merged onto their base, and for legacy ``pytorch_model.bin`` checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.errors import ModelSourceError

logger = logging.getLogger(__name__)

# safetensors dtype codes -> torch dtypes (the ones a language-model checkpoint can hold).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):  # pragma: no branch
        ST_DTYPES["F8_E4M3" if _name.endswith("fn") else "F8_E5M2"] = getattr(torch, _name)
        TORCH_TO_ST[getattr(torch, _name)] = "F8_E4M3" if _name.endswith("fn") else "F8_E5M2"

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: ``file`` and absolute byte range ``[start, end)`` inside it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a ``.safetensors`` header: name -> :class:`TensorInfo` (file order) and ``__metadata__``."""
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
    infos: dict[str, TensorInfo] = {}
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        code = entry["dtype"]
        if code not in ST_DTYPES:
            raise ModelSourceError(f"Tensor {name!r} in {str(file)!r} has unsupported dtype {code}.")
        start, end = entry["data_offsets"]
        infos[name] = TensorInfo(file, ST_DTYPES[code], tuple(entry["shape"]), data_start + start, data_start + end)
    return infos, metadata


class ByteBuffer:
    """A grow-only byte buffer reused across tensors instead of allocating a fresh one for each.

    The streaming merge keeps one per source (reads) and one for the result, per thread: a fresh
    buffer costs a page fault per 4 KB on first touch, which was a fifth of a small merge's CPU time.
    What is read or built in it is valid until the buffer is used again.
    """

    def __init__(self) -> None:
        self._data = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` bytes of the buffer (grown when too small)."""
        if self._data.numel() < nbytes:
            self._data = torch.empty(0, dtype=torch.uint8)  # free the old one before the bigger one
            self._data = torch.empty(nbytes, dtype=torch.uint8)
        return self._data[:nbytes]

    def tensor(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``dtype`` tensor of ``shape`` in the buffer."""
        nbytes = math.prod(shape) * dtype.itemsize
        return self.take(nbytes).view(dtype).reshape(shape)


class TensorReader:
    """Common interface of checkpoint readers."""

    path: str
    config: dict[str, Any]

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get_tensor(self, name: str, into: ByteBuffer | None = None) -> torch.Tensor:
        """Tensor ``name`` (CPU, stored dtype). Readers over files may read it into ``into`` (then it
        is valid until the next read into that buffer); in-memory readers ignore it."""
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())

    def close(self) -> None:
        """Release open files (no-op for in-memory readers)."""

    def __enter__(self):  # returns self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_config(model_dir: Path) -> dict[str, Any]:
    file = model_dir / "config.json"
    if not file.is_file():
        raise ModelSourceError(f"{str(model_dir)!r} has no config.json; it is not a Hugging Face model directory.")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{str(file)!r} is not valid JSON: {exc}") from exc


class CheckpointReader(TensorReader):
    """Lazy reader over a model directory's ``*.safetensors`` (single file or sharded with an index)."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.path = str(model_dir)
        directory = Path(model_dir)
        if not directory.is_dir():
            raise ModelSourceError(f"Model directory {self.path!r} does not exist; check the path.")
        self.config = read_config(directory)
        index_file = directory / INDEX_FILE
        if index_file.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ModelSourceError(f"{str(index_file)!r} is not a valid safetensors index: {exc}") from exc
            files = list(dict.fromkeys(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise ModelSourceError(
                    f"{self.path!r} holds no *.safetensors weights (model.safetensors or an index); "
                    "convert the checkpoint to safetensors first."
                )
        self._index: dict[str, TensorInfo] = {}
        for file_name in files:
            file = directory / file_name
            if not file.is_file():
                raise ModelSourceError(f"Shard {file_name!r} listed in {self.path!r}'s index is missing.")
            infos, _ = read_safetensors_header(file)
            self._index.update(infos)
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def info(self, name: str) -> TensorInfo:
        try:
            return self._index[name]
        except KeyError:
            raise ModelSourceError(f"Tensor {name!r} is not in checkpoint {self.path!r}.") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def get_tensor(self, name: str, into: ByteBuffer | None = None) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype) with a single positioned read; thread-safe."""
        info = self.info(name)
        buffer = into.take(info.nbytes) if into is not None else torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            fd = self._fd(info.file)
            view = memoryview(buffer.numpy())
            done = 0
            while done < info.nbytes:  # os.preadv may return short reads on some filesystems
                got = os.preadv(fd, [view[done:]], info.start + done)
                if got <= 0:
                    raise ModelSourceError(f"{str(info.file)!r} is truncated while reading tensor {name!r}.")
                done += got
        if info.dtype == torch.bool:
            return buffer.view(torch.bool).reshape(info.shape)
        return buffer.view(info.dtype).reshape(info.shape)

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._handles.get(file)
            if fd is None:
                fd = os.open(file, os.O_RDONLY)
                self._handles[file] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort when a caller forgot close()
        if getattr(self, "_handles", None):
            for fd in self._handles.values():
                # No logging here: at interpreter shutdown module globals may already be gone.
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._handles.clear()


class StateDictReader(TensorReader):
    """The reader interface over an in-memory ``{name: tensor}`` (e.g. a LoRA merged onto its base)."""

    def __init__(self, state: dict[str, torch.Tensor], config: dict[str, Any], path: str = "<memory>") -> None:
        self._state = state
        self.config = config
        self.path = path

    def names(self) -> list[str]:
        return list(self._state)

    def __contains__(self, name: object) -> bool:
        return name in self._state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def get_tensor(self, name: str, into: ByteBuffer | None = None) -> torch.Tensor:
        return self._get(name)

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._state[name]
        except KeyError:
            raise ModelSourceError(f"Tensor {name!r} is not in model {self.path!r}.") from None


def open_checkpoint(model_dir: str | os.PathLike[str]) -> TensorReader:
    """A reader for a local model directory: safetensors lazily, ``pytorch_model*.bin`` in memory."""
    directory = Path(model_dir)
    if directory.is_dir() and not any(directory.glob("*.safetensors")):
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if bins:
            logger.warning("%s has only .bin weights; loading them in memory (weights_only=True)", directory)
            state: dict[str, torch.Tensor] = {}
            for file in bins:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
            return StateDictReader(state, read_config(directory), str(directory))
    return CheckpointReader(directory)
