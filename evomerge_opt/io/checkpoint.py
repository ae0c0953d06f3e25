"""Lazy checkpoint readers: one tensor at a time from a model directory's safetensors (sharded or not).

``open_checkpoint(path)`` returns a :class:`CheckpointReader` whose index maps every tensor name to
``(file, dtype, shape)`` without reading any tensor data; ``get_tensor(name)`` reads exactly that
tensor's bytes.

Why not ``safe_open``'s mmap of whole files: every page of a mapping that is touched counts in the
process's resident set until the mapping is closed, so reading three models that way makes the peak
RSS the size of all three checkpoints. Headers are parsed once (:mod:`evomerge_opt.io.safetensors_files`);
``get_tensor(name)`` reads a tensor's byte range into a fresh buffer the caller owns, and
``map_tensor(name)`` maps just that range, read-only in effect, and unmaps it when the tensor is freed
(the streaming merge: no copy, and mapped pages never pile up).

``StateDictReader`` gives the same interface over an in-memory state dict (used for LoRA sources
merged onto their base, and for legacy ``pytorch_model.bin`` checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge_opt.errors import ModelSourceError
from evomerge_opt.io.safetensors_files import (  # noqa: F401  (re-exported)
    INDEX_FILE,
    SINGLE_FILE,
    read_config,
    read_header,
    weight_files,
)

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
    raw, metadata = read_header(file)
    infos: dict[str, TensorInfo] = {}
    for name, info in raw.items():
        if info.dtype not in ST_DTYPES:
            raise ModelSourceError(f"Tensor {name!r} in {str(file)!r} has unsupported dtype {info.dtype}.")
        infos[name] = TensorInfo(info.file, ST_DTYPES[info.dtype], info.shape, info.start, info.end)
    return infos, metadata


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

    def get_tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (CPU, stored dtype), owned by the caller."""
        raise NotImplementedError

    def map_tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (CPU, stored dtype) for reading only, without a copy where the reader can
        (file readers map it); in-memory readers return the tensor itself."""
        return self.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())

    def close(self) -> None:
        """Release open files (no-op for in-memory readers)."""

    def __enter__(self):  # returns self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointReader(TensorReader):
    """Lazy reader over a model directory's ``*.safetensors`` (single file or sharded with an index)."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.path = str(model_dir)
        directory = Path(model_dir)
        if not directory.is_dir():
            raise ModelSourceError(f"Model directory {self.path!r} does not exist; check the path.")
        self.config = read_config(directory)
        self._index: dict[str, TensorInfo] = {}
        for file in weight_files(directory):
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

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype) with a single positioned read; thread-safe."""
        info = self.info(name)
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
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

    def map_tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` mapped from its file, without a copy (read it only; thread-safe).

        Only the pages holding the tensor are mapped, privately, and unmapped when the tensor is
        freed, so mapped pages never pile up in the process's memory. Compared with a read this
        skips copying from the page cache and faulting in fresh pages: ~0.3 s of CPU on the three
        270 MB inputs of a small merge.
        """
        info = self.info(name)
        if not info.nbytes:
            return self.get_tensor(name)
        fd = self._fd(info.file)
        if os.fstat(fd).st_size < info.end:  # touching a page past the end of a file is SIGBUS
            raise ModelSourceError(f"{str(info.file)!r} is truncated: tensor {name!r} ends past the end of the file.")
        start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        # ACCESS_COPY: writable for torch.from_numpy (no read-only warning), never written back.
        mapped = mmap.mmap(fd, info.end - start, access=mmap.ACCESS_COPY, offset=start)
        data = torch.from_numpy(np.frombuffer(mapped, dtype=np.uint8, count=info.nbytes, offset=info.start - start))
        if info.dtype == torch.bool:
            return data.view(torch.bool).reshape(info.shape)
        return data.view(info.dtype).reshape(info.shape)

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

    def get_tensor(self, name: str) -> torch.Tensor:
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
