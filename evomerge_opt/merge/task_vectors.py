"""Task vectors on disk: ``x - b`` of every tensor two checkpoints share, cached by content.

``<cache_dir("task_vectors")>/<sha256(base content, fine-tune content)>.safetensors`` (float32), used
by ``evo-merge compare`` to report and reuse each fine-tune's task vector.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from evomerge_opt.errors import ModelSourceError, ShapeMismatchError
from evomerge_opt.io.hashing import model_content_hash
from evomerge_opt.paths import cache_dir as default_cache_dir

logger = logging.getLogger(__name__)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a full-model directory."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{str(path)!r} holds no .safetensors weights; task vectors need them.")
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                index[name] = file
    return index


def compute_task_vector(
    base_ref: str, finetune_ref: str, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """``x - b`` of every tensor the two checkpoints share, as float32 safetensors (cached by content).

    Full models are streamed tensor by tensor from their safetensors; a PEFT adapter is loaded merged
    onto the base (one model in memory). Tensors only in one of the two are reported and skipped.
    """
    import safetensors.torch as st
    from safetensors import safe_open

    from evomerge_opt.io.atomic import atomic_write_bytes
    from evomerge_opt.io.sources import is_peft_adapter, resolve_model_ref

    base_hash = model_content_hash(base_ref)
    ft_hash = model_content_hash(finetune_ref, base_model=base_ref)
    key = hashlib.sha256(f"tv1:{base_hash}:{ft_hash}".encode()).hexdigest()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir("task_vectors")
    path = directory / f"{key}.safetensors"
    if path.is_file():
        return path
    base_dir = Path(resolve_model_ref(base_ref))
    base_index = checkpoint_files(base_dir)
    ft_dir = Path(resolve_model_ref(finetune_ref))
    if is_peft_adapter(ft_dir):
        from evomerge_opt.pool import load_causal_lm

        model = load_causal_lm(str(ft_dir), dtype=torch.float32, base_model=base_ref)
        ft_tensors = {k: v.detach() for k, v in model.state_dict().items()}
        get_ft = ft_tensors.get
        ft_names = set(ft_tensors)
    else:
        ft_index = checkpoint_files(ft_dir)
        ft_names = set(ft_index)

        def get_ft(name: str) -> torch.Tensor:
            with safe_open(str(ft_index[name]), framework="pt") as handle:
                return handle.get_tensor(name)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(base_index) & ft_names):
        with safe_open(str(base_index[name]), framework="pt") as handle:
            b = handle.get_tensor(name)
        x = get_ft(name)
        if x.shape != b.shape:
            raise ShapeMismatchError(
                f"Tensor {name!r} has shape {tuple(x.shape)} in {finetune_ref!r} but {tuple(b.shape)} in the base."
            )
        if b.is_floating_point():
            out[name] = x.float() - b.float()
    skipped = (set(base_index) ^ ft_names)
    if skipped:
        logger.warning("task vector %s: %d tensors present in only one checkpoint (skipped), e.g. %s",
                       finetune_ref, len(skipped), sorted(skipped)[:3])
    atomic_write_bytes(path, st.save(out, metadata={"base": str(base_ref), "finetune": str(finetune_ref)}))
    return path
