"""Seed-003 API: ``dfs_merge_from_config(merge_config, output_path=None, device="cpu") -> (model, tokenizer)``.

Loads the sources of a DFS recipe (paths, ``zoo:`` refs, hub ids with revisions, PEFT adapters, or
inline parameter-space recipes merged in memory first: PS+DFS), builds the candidate by reference
(:func:`evomerge_opt.dfs.build.build_dfs_candidate`) and optionally writes a portable directory
(:func:`evomerge_opt.dfs.save.save_dfs_model`). The ``evo-merge apply`` path streams instead: :func:`evomerge_opt.dfs.stream.apply_dfs_recipe`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from evomerge_opt.config.dfs_recipe import DFSRecipe, DFSSource, load_dfs_recipe
from evomerge_opt.config.model_config import parse_dtype
from evomerge_opt.dfs.build import build_dfs_candidate
from evomerge_opt.dfs.save import save_dfs_model
from evomerge_opt.errors import ModelSourceError

logger = logging.getLogger(__name__)

__all__ = ["dfs_excute_from_config", "dfs_merge_from_config", "load_dfs_sources", "save_dfs_model"]


def _is_seq_cls(path: str, revision: str | None) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"Cannot read the config of {path!r}: {exc}") from exc
    return any(str(arch).endswith("ForSequenceClassification") for arch in (config.architectures or []))


def _load_source(
    recipe: DFSRecipe, source: DFSSource, device: str, dtype: torch.dtype | None, task: str
) -> tuple[Any, str]:
    """``(model, tokenizer reference)`` of one ``model_paths`` entry."""
    if source.ps_recipe is not None:
        from evomerge_opt.config.recipe import parse_ps_recipe
        from evomerge_opt.merge.build import build_ps_model

        ps = parse_ps_recipe(source.ps_recipe, "model_paths entry (inline parameter-space recipe)", recipe._source_dir)
        model = build_ps_model(ps, device=device, dtype=dtype)
        tokenizer_ref = ps.tokenizer_source if ps.tokenizer_source not in (None, "base") else (
            ps.base_model or ps.models[0].model
        )
        return model.eval(), ps.resolve_ref(tokenizer_ref)
    from evomerge_opt.io.sources import is_peft_adapter

    path = recipe.resolve_ref(source.path)
    seq_cls = task == "sequence_classification" or (
        task == "auto" and not is_peft_adapter(path) and _is_seq_cls(path, source.revision)
    )
    if seq_cls:
        from transformers import AutoModelForSequenceClassification

        return _from_pretrained(AutoModelForSequenceClassification, path, source.revision, dtype, device,
                                "as a sequence classifier"), path
    if source.revision is not None:
        from transformers import AutoModelForCausalLM

        return _from_pretrained(AutoModelForCausalLM, path, source.revision, dtype, device,
                                f"at revision {source.revision!r}"), path
    from evomerge_opt.pool import load_causal_lm

    return load_causal_lm(path, dtype=dtype, device=device), path


def load_dfs_sources(
    recipe: DFSRecipe, device: str = "cpu", dtype: str | torch.dtype | None = None
) -> tuple[list[Any], list[str]]:
    """Load every source of ``recipe`` once: ``(models, tokenizer references)``.

    ``dtype`` None loads each checkpoint in its stored dtype; when they then disagree, all are cast to
    float32 (they must share one dtype to be routed through each other).
    """
    load_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    models, tokenizer_refs = [], []
    for index, source in enumerate(recipe.sources):
        logger.info("loading DFS source %d/%d: %s", index + 1, recipe.num_models, source.name)
        model, tok_ref = _load_source(recipe, source, device, load_dtype, recipe.task)
        models.append(model)
        tokenizer_refs.append(tok_ref)
    dtypes = {next(m.parameters()).dtype for m in models}
    if len(dtypes) > 1:
        logger.warning("DFS sources have different dtypes %s; casting all to float32", sorted(map(str, dtypes)))
        models = [m.to(torch.float32) for m in models]
    return models, tokenizer_refs


def _load_tokenizer(ref: str, revision: str | None) -> Any:
    if revision is None:
        from evomerge_opt.pool import load_tokenizer

        return load_tokenizer(ref)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref, revision=revision)


def dfs_merge_from_config(
    merge_config: str | os.PathLike[str] | dict[str, Any] | DFSRecipe,
    output_path: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    *,
    load_dtype: str | torch.dtype | None = None,
    save_dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> tuple[Any, Any]:
    """Build the DFS model of ``merge_config`` (YAML path, mapping or recipe); save it if ``output_path``.

    Returns ``(model, tokenizer)``: the in-memory Evo*Affine model (sharing the freshly loaded sources'
    modules) and the tokenizer of ``input_layer_model``'s source (None, with a warning, if it has none). ``save_dtype`` defaults to the
    recipe's ``dtype`` or bfloat16.
    """
    recipe = load_dfs_recipe(merge_config)
    models, tokenizer_refs = load_dfs_sources(recipe, device=device, dtype=load_dtype)
    model = build_dfs_candidate(models, recipe)
    source = recipe.sources[recipe.input_layer_model]
    try:
        tokenizer = _load_tokenizer(tokenizer_refs[recipe.input_layer_model], source.revision)
    except (ModelSourceError, OSError, ValueError) as exc:
        # The merged model is valid without one; say so loudly instead of failing the merge.
        logger.warning(
            "no tokenizer could be loaded from input_layer_model's source %r (%s); the output has no tokenizer "
            "files, copy them from the source you tokenize with", tokenizer_refs[recipe.input_layer_model], exc,
        )
        tokenizer = None
    if output_path is not None:
        dtype = save_dtype if save_dtype is not None else recipe.output_dtype_name()
        save_dfs_model(model, tokenizer, output_path, dtype=dtype, overwrite=overwrite, recipe=recipe)
    return model, tokenizer


# The seed's name for the same function (sic: "excute"), kept so seed-003 scripts run unchanged.
dfs_excute_from_config = dfs_merge_from_config


def _from_pretrained(auto_cls: Any, path: str, revision: str | None, dtype: Any, device: Any, what: str) -> Any:
    """``auto_cls.from_pretrained`` on ``device`` in eval mode; a load failure is a ModelSourceError."""
    kwargs: dict[str, Any] = {"revision": revision}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = auto_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"Cannot load {path!r} {what}: {exc}") from exc
    return model.to(device).eval()
