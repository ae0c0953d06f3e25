"""The one dispatcher: a PS or DFS recipe -> an in-memory model, or -> a Hugging Face directory.

``dfs`` may use ``merge`` (inline PS sources of a PS+DFS recipe), never the reverse; deciding which
of the two a recipe needs happens here, above both. Nothing heavy is imported at module level (torch
loads with the first merge), so ``evo-merge apply`` can start its numpy pre-pass first.

* :func:`merge_recipe` — ``recipe -> PreTrainedModel`` (PS: :func:`~evomerge_opt.merge.build.build_ps_model`;
  DFS: :func:`~evomerge_opt.dfs.api.dfs_merge_from_config`).
* :func:`apply_recipe` — ``recipe -> output directory`` (PS: :func:`~evomerge_opt.merge.engine.stream_merge`;
  DFS: :func:`~evomerge_opt.dfs.stream.apply_dfs_recipe`, streamed, ``format`` evo | plain), what
  ``evo-merge apply`` runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge_opt.config.recipe import PSRecipe, load_recipe

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from evomerge_opt.merge._base import ImportanceProvider
    from evomerge_opt.merge.topk import TopK

__all__ = ["apply_recipe", "check_output_format", "merge_recipe"]


def merge_recipe(
    recipe: str | os.PathLike[str] | dict[str, Any] | Any,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    importance: ImportanceProvider | None = None,
) -> Any:
    """The merged ``PreTrainedModel`` of ``recipe`` (a YAML path, a mapping or a parsed recipe).

    A parameter-space recipe is merged with :class:`~evomerge_opt.merge.resident.ResidentMerger` (the
    base is loaded once and the merged weights written into it; ``importance`` defaults to the one its
    ``calibration:`` gives); a data-flow-space recipe is built by
    :func:`evomerge_opt.dfs.api.dfs_merge_from_config` (``importance`` does not apply).
    """
    parsed = load_recipe(recipe)
    if isinstance(parsed, PSRecipe):
        from evomerge_opt.merge.build import build_ps_model

        return build_ps_model(parsed, device=device, dtype=dtype, importance=importance)
    from evomerge_opt.dfs.api import dfs_merge_from_config

    config = recipe if isinstance(recipe, (dict, str, os.PathLike)) else parsed
    return dfs_merge_from_config(config, device=str(device))[0]


def check_output_format(recipe: Any, format: str) -> None:
    """``format`` (evo | plain) must fit the recipe: a PS recipe's output is already a standard model."""
    if format != "evo" and isinstance(recipe, PSRecipe):
        from evomerge_opt.errors import ConfigError

        raise ConfigError(f"--format {format} applies to data-flow-space recipes; this is a parameter-space "
                          "recipe, whose output is already a standard model. Drop --format.")


def apply_recipe(
    recipe: str | os.PathLike[str] | dict[str, Any] | Any,
    out_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    progress: bool = False,
    known_topk: Mapping[tuple[str, int], TopK] | None = None,
    format: str = "evo",
) -> Path:
    """Write the model of ``recipe`` as a Hugging Face directory ``out_dir`` (atomically); return it.

    PS recipes stream tensor by tensor (``max_shard_size``, ``progress`` and the pre-pass table
    ``known_topk`` apply to them); DFS recipes stream too, into the portable Evo*Affine directory
    (``format="evo"``) or a standard Llama/Mistral (``format="plain"``); ``dtype`` is the saved dtype,
    default the recipe's, else bfloat16. ``format`` other than evo for a PS recipe is a ``ConfigError``.
    """
    parsed = load_recipe(recipe)
    if isinstance(parsed, PSRecipe):
        from evomerge_opt.merge.engine import stream_merge

        check_output_format(parsed, format)
        return Path(stream_merge(
            parsed, out_dir, device=device, dtype=dtype, overwrite=overwrite, max_shard_size=max_shard_size,
            progress=progress, known_topk=known_topk,
        ))
    from evomerge_opt.dfs.stream import apply_dfs_recipe

    return Path(apply_dfs_recipe(parsed, out_dir, device=device, dtype=dtype, overwrite=overwrite, format=format,
                                 max_shard_size=max_shard_size, progress=progress))
