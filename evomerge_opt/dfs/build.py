"""Build a DFS candidate in memory from already-loaded source models, by reference.

``build_dfs_candidate(models, recipe)`` returns an ``Evo{Llama,Mistral}Affine{ForCausalLM,
ForSequenceClassification}`` whose embeddings, decoder layers, final norm, rotary embedding and head
ARE the source models' modules (no weight copies, no weight init): only the per-hop scale/bias tensors
(a few numbers, or D / D x D per hop) are new, created on the sources' device and dtype. Building one
costs a few milliseconds (75 hops over SmolLM2-135M-sized models: ~5 ms CPU, see benchmarks/dfs_build.py),
so a search can build one candidate per trial from models loaded once.

Candidates share modules with the sources and with each other: do not train one, and do not move one
to another device/dtype (that would move the sources); save it with :func:`evomerge_opt.dfs.save.save_dfs_model`,
which casts copies.
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any

import torch
from torch import nn

from evomerge_opt.config.dfs_recipe import DFSRecipe, load_dfs_recipe
from evomerge_opt.dfs import modeling_evo_affine as evo
from evomerge_opt.errors import ConfigError, ShapeMismatchError

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral")
# (family, task) -> (config class, model class)
WRAPPERS: dict[tuple[str, str], tuple[type, type]] = {
    ("llama", "causal_lm"): (evo.EvoLlamaAffineConfig, evo.EvoLlamaAffineForCausalLM),
    ("mistral", "causal_lm"): (evo.EvoMistralAffineConfig, evo.EvoMistralAffineForCausalLM),
    ("llama", "sequence_classification"): (evo.EvoLlamaAffineConfig, evo.EvoLlamaAffineForSequenceClassification),
    ("mistral", "sequence_classification"): (
        evo.EvoMistralAffineConfig,
        evo.EvoMistralAffineForSequenceClassification,
    ),
}
# Keys of the source config that must not be carried into the Evo config.
_DROP_CONFIG_KEYS = (
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "_name_or_path",
    "num_hidden_layers",
    "layer_types",
    "dtype",
    "torch_dtype",
    "_attn_implementation_autoset",
    *evo.EVO_CONFIG_KEYS,
)


_WARNED_ROPE: set[tuple[str, ...]] = set()


def config_family(config: Any, index: int = 0) -> str:
    """``"llama"`` or ``"mistral"`` from a source's config; anything else is an error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ShapeMismatchError(
            f"model_paths[{index}] is a {model_type!r} model; data-flow-space merging supports "
            f"{', '.join(FAMILIES)} (CausalLM or SequenceClassification)."
        )
    return model_type


def source_family(model: nn.Module, index: int = 0) -> str:
    """``"llama"`` or ``"mistral"`` from the model's config; anything else is an error."""
    return config_family(getattr(model, "config", None), index)


def source_task(model: nn.Module) -> str:
    """``"sequence_classification"`` when the model has a ``score`` head, else ``"causal_lm"``."""
    if hasattr(model, "score") and not hasattr(model, "lm_head"):
        return "sequence_classification"
    if hasattr(model, "lm_head"):
        return "causal_lm"
    raise ShapeMismatchError(
        f"{type(model).__name__} has neither an `lm_head` nor a `score` head; load the sources as "
        "*ForCausalLM or *ForSequenceClassification."
    )


def _head(model: nn.Module, task: str) -> nn.Module:
    return model.lm_head if task == "causal_lm" else model.score


def check_source_configs(configs: list[Any], tasks: list[str], recipe: DFSRecipe) -> tuple[str, str]:
    """The checks of :func:`check_sources` that need only the sources' configs; ``(family, task)``.

    Used as they are by the streaming ``apply`` (:mod:`evomerge_opt.dfs.stream`), which never loads a model.
    """
    if len(configs) != recipe.num_models:
        raise ConfigError(
            f"`len(models) == len(model_paths)` must hold, but got {len(configs)} models for "
            f"{recipe.num_models} model_paths entries."
        )
    families = [config_family(c, i) for i, c in enumerate(configs)]
    if len(set(families)) > 1 or len(set(tasks)) > 1:
        raise ShapeMismatchError(
            f"All sources must share an architecture and head, but got {list(zip(families, tasks))}; "
            "merge Llama with Llama and Mistral with Mistral, all CausalLM or all SequenceClassification."
        )

    def same(attr: str, getter=None) -> None:
        values = [getter(c) if getter else getattr(c, attr, None) for c in configs]
        if len(set(map(repr, values))) > 1:
            raise ShapeMismatchError(
                f"All source models must have the same {attr}, but got {values} for model_paths 0..{len(values) - 1}; "
                "data-flow-space merging routes one hidden state through all of them."
            )

    same("hidden_size")
    same("vocab_size")
    same("head_dim", lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    if families[0] == "mistral":
        same("sliding_window")
    rope = [repr(getattr(c, "rope_parameters", None)) for c in configs]
    if len(set(rope)) > 1 and tuple(rope) not in _WARNED_ROPE:  # once per set of sources, not per trial
        _WARNED_ROPE.add(tuple(rope))
        logger.warning(
            "source models have different rope parameters %s; every layer uses those of output_layer_model %d",
            rope, recipe.output_layer_model,
        )
    rows = recipe.layers_per_model()
    for m, (config, length) in enumerate(zip(configs, rows)):
        if config.num_hidden_layers != length:
            raise ShapeMismatchError(
                f"layer_mask rows for model {m} have {length} entries, but model_paths[{m}] has "
                f"{config.num_hidden_layers} decoder layers; expected shape [num_r][M][L] with L = "
                f"{config.num_hidden_layers} for that model."
            )
    return families[0], tasks[0]


def check_sources(models: list[nn.Module], recipe: DFSRecipe) -> tuple[str, str]:
    """Check the loaded sources against each other and the recipe; return ``(family, task)``.

    Rules: same family (llama/mistral) and head type; same hidden size, vocabulary, head dim (the rotary
    embedding of the output model is used for every layer), dtype and device; Mistral sliding windows
    equal; every model has as many layers as its mask rows. (Factor sizes are checked while building.)
    """
    if len(models) != recipe.num_models:
        raise ConfigError(
            f"`len(models) == len(model_paths)` must hold, but got {len(models)} models for "
            f"{recipe.num_models} model_paths entries."
        )
    for i, m in enumerate(models):
        source_family(m, i)
    family, task = check_source_configs([m.config for m in models], [source_task(m) for m in models], recipe)
    dtypes = [next(m.parameters()).dtype for m in models]
    devices = [next(m.parameters()).device for m in models]
    if len(set(dtypes)) > 1 or len(set(devices)) > 1:
        raise ShapeMismatchError(
            f"All source models must be on one device with one dtype, but got dtypes {dtypes} and devices "
            f"{devices}; load them with the same dtype and device."
        )
    attn = [m.config._attn_implementation for m in models]
    if len(set(attn)) > 1:
        raise ShapeMismatchError(
            f"All source models must use the same attention implementation (it decides the mask format), "
            f"but got {attn}; load them with the same attn_implementation."
        )
    return family, task


def _factor_tensor(
    value: Any, where: str, hidden: int, dtype: torch.dtype, device: torch.device
) -> tuple[str, torch.Tensor | None]:
    """``(kind, tensor)`` of a (structurally validated) scaling/bias entry; sizes must equal ``hidden``."""
    if value is None:
        return "none", None
    tensor = torch.tensor(value, dtype=dtype, device=device)
    kind = ("scalar", "vector", "matrix")[tensor.dim()]
    if tensor.dim() and any(size != hidden for size in tensor.shape):
        raise ShapeMismatchError(
            f"{where} is a {kind} of shape {list(tensor.shape)}, but the models' hidden size is {hidden}; "
            f"a vector must have D={hidden} entries and a matrix be {hidden}x{hidden}."
        )
    return kind, tensor


def routing(recipe: DFSRecipe) -> dict[str, Any]:
    """The hop table and physical-layer table of a recipe (plain lists, as in the Evo config)."""
    hop_table = [[m, l] for _, m, l in recipe.hops()]
    physical: list[list[int]] = []
    index: dict[tuple[int, int], int] = {}
    hop_to_physical = []
    for m, l in hop_table:
        key = (m, l)
        if key not in index:
            index[key] = len(physical)
            physical.append([m, l])
        hop_to_physical.append(index[key])
    return {"hop_table": hop_table, "physical_layers": physical, "hop_to_physical": hop_to_physical}


# Template Evo configs per (output config, input config, family, task, tied): building a strict HF config
# costs ~1 ms, a shallow copy of a template ~20 us. Weak references make a recycled id() harmless.
_TEMPLATES: dict[tuple[Any, ...], tuple[weakref.ref, weakref.ref, Any]] = {}


def _template_config(out_config: Any, in_config: Any, family: str, task: str, tied: bool) -> Any:
    key = (id(out_config), id(in_config), family, task, tied)
    cached = _TEMPLATES.get(key)
    if cached is not None and cached[0]() is out_config and cached[1]() is in_config:
        return cached[2]
    config_cls, model_cls = WRAPPERS[(family, task)]
    data = {k: v for k, v in out_config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    # Token ids follow the tokenizer, which is the input model's.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        data[name] = getattr(in_config, name, None)
    data["tie_word_embeddings"] = tied
    template = config_cls(**data)
    template._attn_implementation = out_config._attn_implementation
    template.architectures = [model_cls.__name__]
    if len(_TEMPLATES) > 64:
        _TEMPLATES.clear()
    _TEMPLATES[key] = (weakref.ref(out_config), weakref.ref(in_config), template)
    return template


def make_evo_config(
    models: list[nn.Module],
    recipe: DFSRecipe,
    family: str,
    task: str,
    scale_kinds: list[str],
    bias_kinds: list[str],
    source_names: list[str] | None = None,
):
    """The ``Evo*AffineConfig`` of a candidate from its loaded sources (see :func:`evo_config_for`)."""
    return evo_config_for([m.config for m in models], recipe, family, task, scale_kinds, bias_kinds, source_names)


def evo_config_for(
    configs: list[Any],
    recipe: DFSRecipe,
    family: str,
    task: str,
    scale_kinds: list[str],
    bias_kinds: list[str],
    source_names: list[str] | None = None,
):
    """The ``Evo*AffineConfig`` of a candidate: the output model's config plus the routing.

    ``configs`` are the sources' configs. Token ids come from the input model (its tokenizer is the
    output's); the head is tied only when embeddings and head come from the same model and that model
    ties them. ``num_hidden_layers`` is the number of hops (one KV-cache layer per hop).
    """
    out_config = configs[recipe.output_layer_model]
    in_config = configs[recipe.input_layer_model]
    tied = bool(
        recipe.input_layer_model == recipe.output_layer_model and getattr(out_config, "tie_word_embeddings", False)
    )
    config = copy.copy(_template_config(out_config, in_config, family, task, tied))
    table = routing(recipe)
    config.hop_table = table["hop_table"]
    config.physical_layers = table["physical_layers"]
    config.hop_to_physical = table["hop_to_physical"]
    config.scale_kinds = list(scale_kinds)
    config.bias_kinds = list(bias_kinds)
    config.input_layer_model = recipe.input_layer_model
    config.output_layer_model = recipe.output_layer_model
    config.num_r = recipe.num_r
    config.num_source_models = recipe.num_models
    config.source_num_layers = [c.num_hidden_layers for c in configs]
    config.source_model_names = list(source_names or [s.name for s in recipe.sources])
    config.num_hidden_layers = len(config.hop_table)
    config.architectures = list(config.architectures)
    evo._finish_evo_config(config)  # layer_types for the hops, then the consistency checks
    return config


def build_dfs_candidate(
    models: list[nn.Module],
    recipe: DFSRecipe | dict[str, Any],
    source_names: list[str] | None = None,
) -> nn.Module:
    """An Evo*Affine model routing through ``models``' layers by reference (see the module docstring).

    ``models[m]`` is the loaded source ``m`` of ``recipe.model_paths`` (``*ForCausalLM`` or
    ``*ForSequenceClassification``, all on one device with one dtype). The wrapper is in eval mode; the
    referenced source modules keep their own mode (``from_pretrained`` gives eval).
    """
    recipe = recipe if isinstance(recipe, DFSRecipe) else load_dfs_recipe(recipe)
    family, task = check_sources(models, recipe)
    first = next(models[0].parameters())
    dtype, device = first.dtype, first.device
    hidden = models[0].config.hidden_size

    hops, scale_kinds, bias_kinds = [], [], []
    for r, m, l in recipe.hops():
        scale_kind, scale = _factor_tensor(recipe.scale_at(r, m, l), f"scaling_factors[{r}][{m}][{l}]", hidden, dtype, device)
        bias_kind, bias = _factor_tensor(recipe.bias_at(r, m, l), f"bias_factors[{r}][{m}][{l}]", hidden, dtype, device)
        hops.append(evo.EvoAffineHop(hidden, scale_kind, bias_kind, scale=scale, bias=bias))
        scale_kinds.append(scale_kind)
        bias_kinds.append(bias_kind)

    config = make_evo_config(models, recipe, family, task, scale_kinds, bias_kinds, source_names)
    backbones = [m.model for m in models]
    parts = {
        "embed_tokens": backbones[recipe.input_layer_model].embed_tokens,
        "layers": [backbones[m].layers[l] for m, l in config.physical_layers],
        "norm": backbones[recipe.output_layer_model].norm,
        "rotary_emb": backbones[recipe.output_layer_model].rotary_emb,
        "hops": hops,
        "head": _head(models[recipe.output_layer_model], task),
        # The input model's generation config (its tokenizer's special tokens), shared, not derived.
        "generation_config": getattr(models[recipe.input_layer_model], "generation_config", None),
    }
    _, model_cls = WRAPPERS[(family, task)]
    candidate = model_cls(config, parts=parts)
    # Eval mode on the wrapper modules only: `candidate.eval()` would walk (and flip) every source
    # module, costing more than the whole build; the source layers keep the mode they were loaded in.
    for module in (candidate, candidate.model, candidate.model.hops, *hops):
        module.training = False
    return candidate
