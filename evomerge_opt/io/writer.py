"""Sharded safetensors writer whose layout is planned up front, so tensors go to disk as they are made.

A merge knows every output tensor's name, dtype and shape before computing any of them (they are the
base model's). :class:`PlannedShardWriter` therefore splits the tensors into shards of at most
``max_shard_size`` bytes, writes each shard's safetensors header and sizes the file at once, and then
``write(name, tensor)`` puts each tensor's bytes at its final offset (``os.pwrite``) the moment it is
computed. Peak memory is one tensor, not one shard, and the files are valid safetensors (tensors laid
out contiguously in header order) readable by ``safetensors``/``transformers``.

Files: ``model.safetensors`` when one shard suffices, else ``model-00001-of-0000N.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {...}}``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.io.atomic import atomic_write_text
from evomerge_opt.io.checkpoint import INDEX_FILE, SINGLE_FILE, TORCH_TO_ST

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MiB"`` -> 524_288_000, ints pass through."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ConfigError(f"Cannot parse size {value!r}; use e.g. '2GB', '500MB' or a number of bytes.")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"`max_shard_size > 0` must hold, but got {value!r}.")
    return size


@dataclass
class _Slot:
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    written: bool = False


class PlannedShardWriter:
    """Write a known set of tensors into safetensors shards, in any order, one tensor at a time.

    ``entries`` is ``[(name, dtype, shape), ...]`` in the order they should be laid out.
    Call :meth:`write` once per name, then :meth:`finish` (which checks nothing is missing and writes
    the index). Use inside an :func:`~evomerge_opt.io.atomic.atomic_output_dir` staging directory.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_size: str | int = "5GB",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        limit = parse_size(max_shard_size)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in entries:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > limit:  # a tensor larger than the limit gets its own shard
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        count = len(shards)
        self.files = [SINGLE_FILE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self._slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self.total_size = 0
        meta = {"format": "pt", **(metadata or {})}
        for shard_index, shard in enumerate(shards):
            header: dict[str, object] = {"__metadata__": meta}
            offset = 0
            for name, dtype, shape, nbytes in shard:
                if dtype not in TORCH_TO_ST:
                    raise ConfigError(f"Tensor {name!r} has dtype {dtype}, which safetensors cannot store.")
                header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
            start = 8 + len(raw)
            path = self.out_dir / self.files[shard_index]
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, start + offset)
            running = start
            for name, dtype, shape, nbytes in shard:
                self._slots[name] = _Slot(shard_index, running, nbytes, dtype, shape)
                running += nbytes
            self.total_size += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (any device; must match the planned dtype and shape) at its offset.

        Threads may write different tensors at the same time (positioned writes to disjoint ranges).
        """
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"Tensor {name!r} was not planned for this output.")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(
                f"Tensor {name!r} was planned as {slot.dtype}{list(slot.shape)} but got "
                f"{tensor.dtype}{list(tensor.shape)}."
            )
        if slot.nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            view = memoryview(data)
            done = 0
            while done < slot.nbytes:
                done += os.pwrite(self._fds[slot.shard], view[done:], slot.offset + done)
        slot.written = True

    def mark_written(self, name: str) -> None:
        """Record that ``name`` was written (by a forked worker, whose own record stays in the child)."""
        self._slots[name].written = True

    def finish(self) -> list[Path]:
        """Check every planned tensor was written, close the files, write the index; return the files."""
        missing = [name for name, slot in self._slots.items() if not slot.written]
        self.close()
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}.")
        if len(self.files) > 1:
            weight_map = {name: self.files[slot.shard] for name, slot in sorted(self._slots.items())}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            atomic_write_text(self.out_dir / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        return [self.out_dir / f for f in self.files]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total
