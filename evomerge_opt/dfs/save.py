"""Write a DFS model as a portable Hugging Face directory (seed 002's "no evo-merge needed to load").

The directory holds ``config.json`` (with ``architectures``, ``auto_map`` and the hop tables),
safetensors weights (bf16 by default; each physical layer once), ``generation_config.json``, the
tokenizer, ``modeling_evo_affine.py`` (self-contained: torch + transformers only), the recipe
(``evomerge_recipe.yml``) and a short model card, so that::

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

works where evo-merge is not installed. The directory is written atomically.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.config.model_config import dtype_name, parse_dtype
from evomerge_opt.dfs import modeling_evo_affine as evo
from evomerge_opt.io.atomic import atomic_output_dir, atomic_write_text

logger = logging.getLogger(__name__)

MODELING_FILE = "modeling_evo_affine.py"
RECIPE_FILE = "evomerge_recipe.yml"


def auto_map_for(model_cls: type) -> dict[str, str]:
    """``auto_map`` entries pointing at the copied modeling file for a wrapper class."""
    module = Path(MODELING_FILE).stem
    name = model_cls.__name__
    family = "Mistral" if "Mistral" in name else "Llama"
    auto_map = {
        "AutoConfig": f"{module}.Evo{family}AffineConfig",
        "AutoModel": f"{module}.Evo{family}AffineModel",
    }
    if name.endswith("ForSequenceClassification"):
        auto_map["AutoModelForSequenceClassification"] = f"{module}.{name}"
    else:
        auto_map["AutoModelForCausalLM"] = f"{module}.{name}"
    return auto_map


def _cast_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors as CPU ``dtype`` tensors; a tensor shared by several keys stays shared.

    Casting makes new tensors, so the (referenced) source models are never modified; sharing is kept so
    that ``save_pretrained`` recognises a tied head.
    """
    out: dict[str, torch.Tensor] = {}
    cast: dict[tuple[int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in cast:
            target = dtype if tensor.is_floating_point() else tensor.dtype
            cast[key] = tensor.detach().to(device="cpu", dtype=target).contiguous()
        out[name] = cast[key]
    return out


def model_card(config: Any, class_name: str, recipe_yaml: str | None, plain: bool = False) -> str:
    """README.md of a DFS output directory (``plain``: a standard Llama/Mistral, no remote code)."""
    sources = "\n".join(f"{i}. `{name}`" for i, name in enumerate(getattr(config, "source_model_names", None) or []))
    if plain:
        names = [str(s.name) for s in _recipe_sources(recipe_yaml)]
        sources = "\n".join(f"{i}. `{name}`" for i, name in enumerate(names)) or "(not recorded)"
        summary = (
            f"Built by evo-merge. A data-flow-space path written as a standard `{class_name}` with "
            f"{config.num_hidden_layers} decoder layers, one per hop (a layer used at several hops is copied); "
            "the hops' scalar scales are folded into each copy's `o_proj` and `down_proj`."
        )
        load = "model = AutoModelForCausalLM.from_pretrained(DIR)"
        note = "No remote code: any stack that serves this architecture serves this model."
    else:
        summary = (
            f"Built by evo-merge. {len(config.hop_table)} hops through {len(config.physical_layers)} distinct "
            f"decoder layers of {config.num_source_models} source models (num_r={config.num_r}); embeddings "
            f"from model {config.input_layer_model}, final norm and head from model {config.output_layer_model}."
        )
        load = "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)"
        note = f"The modeling code is `{MODELING_FILE}` in this directory (torch + transformers only)."
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evo-merge, data-flow-space]",
        "---",
        f"# {class_name} (data-flow-space merge)",
        "",
        summary,
        "",
        "## Sources",
        "",
        sources or "(not recorded)",
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        load,
        "```",
        "",
        note,
    ]
    if recipe_yaml:
        lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _recipe_sources(recipe_yaml: str | None) -> list[Any]:
    if not recipe_yaml:
        return []
    import yaml

    from evomerge_opt.config.dfs_recipe import DFSSource, _parse_source

    data = yaml.safe_load(recipe_yaml) or {}
    parsed = [_parse_source(entry, i) for i, entry in enumerate(data.get("model_paths") or [])]
    return [s for s in parsed if isinstance(s, DFSSource)]


def save_dfs_model(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    dtype: str | torch.dtype | None = torch.bfloat16,
    overwrite: bool = False,
    recipe: Any = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write ``model`` (an Evo*Affine model, e.g. an in-memory candidate) to ``out_dir``; return the path.

    ``dtype``: dtype of the saved floating tensors (default bfloat16; None keeps the model's).
    ``recipe``: a ``DFSRecipe`` (or plain mapping) written beside the weights for provenance.
    """
    from evomerge_opt.config.yamlio import dump_yaml

    target_dtype = parse_dtype(dtype) if dtype is not None else None
    if target_dtype is None:
        target_dtype = next(model.parameters()).dtype
    model_cls = type(model)
    recipe_data = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
    recipe_yaml = dump_yaml(recipe_data) if recipe_data is not None else None
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        state_dict = _cast_state_dict(model, target_dtype)
        saved = (getattr(model.config, "dtype", None), getattr(model.config, "architectures", None))
        try:
            # save_pretrained writes weights (sharded, tied head deduplicated) and generation_config.json.
            model.save_pretrained(staging, state_dict=state_dict, max_shard_size=max_shard_size)
        finally:  # save_pretrained records the in-memory dtype on model.config; put it back
            model.config.dtype, model.config.architectures = saved
        del state_dict
        config = copy.deepcopy(model.config)
        config.dtype = dtype_name(target_dtype)
        config.architectures = [model_cls.__name__]
        config.auto_map = auto_map_for(model_cls)
        config.save_pretrained(staging)  # overwrites the config.json of save_pretrained
        shutil.copy2(Path(evo.__file__), staging / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if recipe_yaml is not None:
            atomic_write_text(staging / RECIPE_FILE, recipe_yaml)
        atomic_write_text(staging / "README.md", model_card(model.config, model_cls.__name__, recipe_yaml))
    logger.info("wrote DFS model (%s, %s) to %s", model_cls.__name__, dtype_name(target_dtype), out_dir)
    return out_dir
