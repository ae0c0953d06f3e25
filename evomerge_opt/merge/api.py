"""Python API: ``merge(recipe) -> model`` builds a merged model in memory (PS or DFS recipe)."""

from __future__ import annotations

import os
from typing import Any

import torch

from evomerge_opt.config.recipe import PSRecipe, load_recipe
from evomerge_opt.merge._base import ImportanceProvider


def merge(
    recipe: str | os.PathLike[str] | dict[str, Any] | PSRecipe | Any,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    importance: ImportanceProvider | None = None,
) -> Any:
    """The merged ``PreTrainedModel`` of ``recipe`` (a YAML path, a mapping or a parsed recipe).

    A parameter-space recipe is merged with :class:`~evomerge_opt.merge.resident.ResidentMerger` (the
    base is loaded once and the merged weights written into it); a data-flow-space recipe is built by
    :func:`evomerge_opt.dfs.api.dfs_merge_from_config`.
    """
    parsed = load_recipe(recipe)
    if isinstance(parsed, PSRecipe):
        from evomerge_opt.merge.resident import ResidentMerger

        if importance is None:
            from evomerge_opt.merge.hessian import importance_from_recipe

            importance = importance_from_recipe(parsed, device=device)  # None unless sparsify: sparsegpt
        merger = ResidentMerger(parsed, device=device, dtype=dtype, importance=importance)
        return merger.build(parsed)
    from evomerge_opt.dfs.api import dfs_merge_from_config

    config = recipe if isinstance(recipe, (dict, str, os.PathLike)) else parsed
    return dfs_merge_from_config(config, device=str(device))[0]
