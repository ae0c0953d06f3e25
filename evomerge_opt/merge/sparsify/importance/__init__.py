"""SparseGPT importance: calibration Hessians of every decoder Linear, their cache, the provider.

Data flow: ``layers`` (find the decoder Linears) -> ``hessians`` (gather ``H`` layer by layer, reduce
to column scales) -> ``scores`` (damping, ``diag(U)^2``, ``d^2 / diag(U)^2``) -> ``cache`` (content-hash
keyed safetensors) -> ``provider`` (:class:`HessianImportance`, :func:`importance_from_recipe`) ->
``sparsegpt`` (the ``sparsegpt`` sparsifier and ``obs_trim``).
"""

from evomerge_opt.merge.sparsify.importance.cache import cached_column_scales, hessian_cache_key
from evomerge_opt.merge.sparsify.importance.hessians import (
    collect_hessians,
    compute_column_scales,
    iter_layer_hessians,
)
from evomerge_opt.merge.sparsify.importance.layers import decoder_layers, decoder_linears, load_source_model
from evomerge_opt.merge.sparsify.importance.provider import (
    HessianImportance,
    importance_from_recipe,
    recipe_uses_sparsegpt,
)
from evomerge_opt.merge.sparsify.importance.scores import (
    CRITERIA,
    DEFAULT_DAMP,
    DIAG_PREFIX,
    column_scale_from_hessian,
    damped_hessian,
    importance_scores,
)
from evomerge_opt.merge.sparsify.importance.sparsegpt import SparseGPTSparsifier, obs_trim

__all__ = [
    "CRITERIA",
    "DEFAULT_DAMP",
    "DIAG_PREFIX",
    "HessianImportance",
    "SparseGPTSparsifier",
    "cached_column_scales",
    "collect_hessians",
    "column_scale_from_hessian",
    "compute_column_scales",
    "damped_hessian",
    "decoder_layers",
    "decoder_linears",
    "hessian_cache_key",
    "importance_from_recipe",
    "importance_scores",
    "iter_layer_hessians",
    "load_source_model",
    "obs_trim",
    "recipe_uses_sparsegpt",
]
