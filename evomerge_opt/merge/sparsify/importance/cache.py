"""The Hessian cache: one source model's column scales, read from disk or computed once.

``<cache_dir("hessians")>/<sha256(model content, calibration tokens, settings)>.safetensors``:
``{weight name: diag(U)^2, "diagH::"+name: diag(H_damped)}`` for one source model; with
``store_hessians=True`` also ``<key>.H.safetensors`` holding every (undamped) ``H``, for SparseGPT's
OBS update (:func:`evomerge_opt.merge.sparsify.importance.sparsegpt.obs_trim`). Keyed by content
(:mod:`evomerge_opt.io.hashing`), never by list position.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from evomerge_opt.io.hashing import model_content_hash, state_dict_hash
from evomerge_opt.merge.sparsify.importance import hessians as gathering
from evomerge_opt.merge.sparsify.importance.layers import load_source_model
from evomerge_opt.merge.sparsify.importance.scores import DEFAULT_DAMP
from evomerge_opt.paths import cache_dir as default_cache_dir

logger = logging.getLogger(__name__)

HESSIAN_FORMAT_VERSION = 2


def hessian_cache_key(model_hash: str, windows_hash: str, damp: float) -> str:
    material = json.dumps({"v": HESSIAN_FORMAT_VERSION, "model": model_hash, "data": windows_hash, "damp": damp},
                          sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()


def cached_column_scales(
    model_ref: str,
    windows,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    damp: float = DEFAULT_DAMP,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    method: str = "layerwise",
    store_hessians: bool = False,
    base_model: str | None = None,
    model: torch.nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], Path]:
    """Column scales of one source model: read from the cache, or computed (model loaded, then freed)."""
    import safetensors.torch as st

    from evomerge_opt.io.atomic import atomic_write_bytes

    model_hash = state_dict_hash(model) if model is not None else model_content_hash(model_ref, base_model)
    key = hessian_cache_key(model_hash, windows.content_hash(), damp)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir("hessians")
    path = directory / f"{key}.safetensors"
    h_path = directory / f"{key}.H.safetensors"
    if path.is_file() and (not store_hessians or h_path.is_file()):
        logger.info("importance of %s from cache %s", model_ref, path.name)
        return st.load_file(str(path)), path
    owned = model is None
    if owned:
        model = load_source_model(model_ref, dtype=dtype, device=device, base_model=base_model)
    try:
        logger.info("computing Hessians of %s on %d calibration rows", model_ref, windows.num_rows)
        scales, hessians = gathering.compute_column_scales(model, windows, batch_size, damp, method, store_hessians)
    finally:
        if owned:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    meta = {"model": str(model_ref), "model_hash": model_hash, "damp": str(damp)}
    atomic_write_bytes(path, st.save(scales, metadata=meta))
    if store_hessians:
        atomic_write_bytes(h_path, st.save(hessians, metadata=meta))
    return scales, path
