"""Build a parameter-space merge in memory: ``build_ps_model(recipe) -> model``.

The one PS-only entry point the rest of the package uses for "recipe -> in-memory model" (the
top-level dispatcher :mod:`evomerge_opt.api` and the DFS loader of inline PS sources). The base is
loaded once by :class:`~evomerge_opt.merge.resident.ResidentMerger` and the merged weights are
written into it; a ``sparsify: sparsegpt`` recipe gets its importance from its ``calibration:``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from evomerge_opt.config.recipe import PSRecipe
from evomerge_opt.merge._base import ImportanceProvider
from evomerge_opt.merge.engine import as_ps_recipe


def build_ps_model(
    recipe: str | os.PathLike[str] | dict[str, Any] | PSRecipe,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    importance: ImportanceProvider | None = None,
) -> Any:
    """The merged ``PreTrainedModel`` of the parameter-space ``recipe`` (a YAML path, mapping or recipe)."""
    from evomerge_opt.merge.resident import ResidentMerger
    from evomerge_opt.merge.sparsify.importance import importance_from_recipe

    parsed = as_ps_recipe(recipe)
    if importance is None:
        importance = importance_from_recipe(parsed, device=device)  # None unless sparsify: sparsegpt
    merger = ResidentMerger(parsed, device=device, dtype=dtype, importance=importance)
    return merger.build(parsed)
