"""Content hashes: files, model directories, in-memory models (cache keys are made of content, never of
names or list positions).

Model content = SHA-256 of its weight and config files (a PEFT adapter: adapter files + its base);
a file's hash is recomputed only when its size or mtime changes (memoised per process).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge_opt.errors import ModelSourceError

if TYPE_CHECKING:
    import torch

_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")
_FILE_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's bytes, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_file_memo(path: Path) -> str:
    """:func:`file_sha256` of ``path``, recomputed only when its size or mtime changes (memoised per process)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASH_MEMO:
        _FILE_HASH_MEMO[key] = file_sha256(path)
    return _FILE_HASH_MEMO[key]


def model_content_hash(ref: str | os.PathLike[str], base_model: str | None = None) -> str:
    """SHA-256 over a model directory's weight and config files (names and bytes).

    A PEFT adapter directory also hashes its base (``base_model`` or the adapter config's
    ``base_model_name_or_path``). A hub id is resolved to its local snapshot when cached; otherwise
    it cannot be hashed and a :class:`ModelSourceError` explains why.
    """
    from evomerge_opt.io.sources import is_peft_adapter, resolve_model_ref

    path = Path(resolve_model_ref(ref))
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(os.fspath(ref), local_files_only=True))
        except Exception as exc:  # any hub failure means "not available locally"
            raise ModelSourceError(
                f"Cannot hash model {os.fspath(ref)!r}: it is neither a local directory nor in the local hub "
                f"cache ({type(exc).__name__}); download it first."
            ) from exc
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_FILE_SUFFIXES)
                   and not p.name.startswith("."))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise ModelSourceError(f"Model directory {str(path)!r} holds no .safetensors or .bin weights.")
    for file in files:
        digest.update(file.name.encode() + b"\0" + hash_file_memo(file).encode())
    if is_peft_adapter(path):
        config = json.loads((path / "adapter_config.json").read_text())
        base = base_model or config.get("base_model_name_or_path")
        if not base:
            raise ModelSourceError(f"Adapter {str(path)!r} names no base model; pass base_model.")
        digest.update(b"base:" + model_content_hash(base).encode())
    return digest.hexdigest()


def state_dict_hash(model: torch.nn.Module) -> str:
    """SHA-256 over an in-memory model's tensors (names, dtypes, shapes, bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
