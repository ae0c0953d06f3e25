"""DFS paths written as ordinary ``LlamaForCausalLM`` / ``MistralForCausalLM`` models (``--format plain``).

A data-flow-space path whose hops only scale the hidden state by positive scalars is an ordinary
pre-norm decoder with one layer per hop (DESIGN.md section 4, "DFS as a plain model"). Hop ``t`` of
the DFS model computes ``h <- s_t * h`` and then decoder layer ``(m_t, l_t)``::

    h <- h + Attn(N1(h));  h <- h + MLP(N2(h))          (N1, N2: RMSNorm)

Let ``c_t = s_0 * s_1 * ... * s_t`` (the running product). An RMSNorm without its eps is
scale-invariant, ``N(k x) = N(x)`` for ``k > 0``, so a plain model whose residual stream carries
``g = (a / c_t) * h`` (any constant ``a > 0``) computes the same thing if the copy of layer
``(m_t, l_t)`` has ``o_proj`` (weight and bias) and ``down_proj`` multiplied by ``a / c_t``::

    (c_t/a) g + Attn(N1((c_t/a) g)) = (c_t/a) (g + (a/c_t) Attn(N1(g)))

and the final norm removes the last factor. The stream starts as ``a * embeddings`` (folded into the
embedding matrix); ``a = c_0`` makes the first hop exact even with eps (see below), which matters most
because the embeddings are the smallest hidden states. When the head is tied to the embeddings, the
final norm's weight is divided by ``a`` so the logits are unchanged. A physical layer used at two hops
is written twice, each copy with its own factor. Embeddings come from ``input_layer_model``, the final
norm and head from ``output_layer_model``; the head is tied only when both come from one model that
ties them.

**The eps bound.** With eps, ``N(x) = w * x / sqrt(mean(x^2) + eps)``. At hop t the DFS model's norm
sees ``k x`` with ``k = c_t / a`` where the plain model sees ``x``, and computes
``w * x / sqrt(m + eps / k^2)`` (``m = mean(x^2)``) against the plain model's ``w * x / sqrt(m + eps)``.
Their ratio is ``r = sqrt((m + eps / k^2) / (m + eps))``, and since ``|r - 1| <= |r^2 - 1|``::

    |N_plain(x) / N_dfs(k x) - 1|  <=  eps * |1 - k^-2| / (m + eps),     k = c_t / c_0,

per RMSNorm (two per hop, and the final norm with ``k = c_{T-1} / c_0``): 0 for the first hop and for
every hop whose running product equals ``c_0``; for eps 1e-5 and ``mean(x^2)`` of 1e-2 (residual
streams past the embeddings are larger) and ``k`` in [0.5, 2], at most 3e-3 per norm and far less in
practice. :func:`norm_bound` evaluates it; tests/test_dfs_plain.py checks the bound on random
inputs, checks that with ``eps = 0`` the plain model equals the DFS model to float rounding, and
measures the end-to-end relative difference of the logits (fp32) against 1e-3.

What cannot be written this way is refused before anything is read or written, naming the slot:
vector or matrix scales (they mix or reweight channels, which no plain layer does), biases other than 0
(a constant added to the residual stream), and scales <= 0 (``N(k x) = -N(x)`` for ``k < 0``, and 0
erases the stream). Use ``--format evo`` for those.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge_opt.config.dfs_recipe import DFSRecipe
from evomerge_opt.errors import ConfigError, ShapeMismatchError
from evomerge_opt.io.atomic import atomic_write_text

FORMATS = ("evo", "plain")

# (family, task) -> the transformers class a plain export is.
PLAIN_ARCHITECTURES = {
    ("llama", "causal_lm"): "LlamaForCausalLM",
    ("mistral", "causal_lm"): "MistralForCausalLM",
    ("llama", "sequence_classification"): "LlamaForSequenceClassification",
    ("mistral", "sequence_classification"): "MistralForSequenceClassification",
}
# Tensors of a decoder layer whose output is added to the residual stream: divided by c_t.
FOLDED_SUFFIXES = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")
# Config fields every layer of a plain model shares: the sources whose layers are used must agree.
LAYER_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                "rms_norm_eps", "attention_bias", "mlp_bias")


def _is_zero(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, (list, tuple)) and all(_is_zero(v) for v in value)


def plain_problems(recipe: DFSRecipe) -> list[str]:
    """Every slot of the path that a plain model cannot express, with the reason (no model is read)."""
    problems = []
    for r, m, l in recipe.hops():
        slot = f"[{r}][{m}][{l}]"
        scale, bias = recipe.scale_at(r, m, l), recipe.bias_at(r, m, l)
        if isinstance(scale, (list, tuple)):
            kind = "matrix" if scale and isinstance(scale[0], (list, tuple)) else "vector"
            problems.append(
                f"scaling_factors{slot} is a {kind} scale; a plain model can fold only a positive scalar "
                f"scale into o_proj/down_proj (a {kind} reweights or mixes channels)."
            )
        elif scale is not None and not scale > 0:
            problems.append(
                f"scaling_factors{slot} = {scale}; a plain model needs a scale > 0 (RMSNorm is invariant to "
                "positive factors only: N(c x) = -N(x) for c < 0, and 0 erases the hidden state)."
            )
        if bias is not None and not _is_zero(bias):
            problems.append(
                f"bias_factors{slot} is a non-zero bias; a plain decoder cannot add a constant to its residual stream."
            )
    return problems


def check_plain_recipe(recipe: DFSRecipe) -> None:
    """Raise :class:`ConfigError` listing every slot ``--format plain`` cannot write."""
    problems = plain_problems(recipe)
    if problems:
        raise ConfigError(
            "This DFS recipe cannot be written with --format plain (a standard Llama/Mistral); write it with "
            "--format evo (the default), which keeps the per-hop scales and biases:",
            problems,
        )


def running_scales(recipe: DFSRecipe, dtype: Any = None) -> list[float]:
    """``c_t = s_0 * ... * s_t`` per hop (float64; an absent scale is 1).

    ``dtype``: the torch dtype the DFS model holds its scales in (the sources' dtype: a candidate built
    from bf16 sources scales by bf16(0.8) = 0.80078125, not 0.8); each ``s_t`` is rounded to it first,
    so the plain model folds the scales the DFS model applies.
    """
    out, product = [], 1.0
    for r, m, l in recipe.hops():
        scale = recipe.scale_at(r, m, l)
        if scale is not None and dtype is not None:
            import torch

            scale = float(torch.tensor(float(scale), dtype=dtype))
        product *= 1.0 if scale is None else float(scale)
        out.append(product)
    return out


@dataclass(frozen=True)
class FoldFactors:
    """What the plain export multiplies by: the embedding matrix, each hop's o_proj/down_proj, the final
    norm's weight (``None``: copied unchanged)."""

    embedding: float | None
    layers: list[float | None]
    final_norm: float | None


def fold_factors(recipe: DFSRecipe, tied: bool, dtype: Any = None) -> FoldFactors:
    """``a = c_0`` into the embeddings, ``a / c_t`` into hop t's o_proj/down_proj, ``1 / a`` into the final
    norm when the head is tied to the embeddings (module docstring); factors equal to 1 are ``None``.
    ``dtype``: see :func:`running_scales`."""
    scales = running_scales(recipe, dtype)
    a = scales[0]

    def factor(value: float) -> float | None:
        return None if value == 1.0 else value

    return FoldFactors(
        embedding=factor(a),
        layers=[factor(a / c) for c in scales],
        final_norm=factor(1.0 / a) if tied else None,
    )


def is_folded(layer_tensor: str) -> bool:
    """Whether a tensor name inside a decoder layer (``self_attn.o_proj.weight``, ...) is divided by c_t."""
    return layer_tensor.endswith(FOLDED_SUFFIXES)


def check_plain_layers(configs: list[Any], recipe: DFSRecipe) -> None:
    """The sources whose layers the path uses must share every per-layer config field (one config)."""
    used = sorted({m for _, m, _ in recipe.hops()})
    for field in LAYER_FIELDS:
        values = {m: getattr(configs[m], field, None) for m in used}
        if field == "head_dim":
            values = {m: v or configs[m].hidden_size // configs[m].num_attention_heads for m, v in values.items()}
        if len({repr(v) for v in values.values()}) > 1:
            raise ShapeMismatchError(
                f"--format plain writes one config for every layer, but the sources the path uses differ in "
                f"{field}: {values} (by model_paths index); use --format evo, which keeps each source's layers."
            )


def plain_config(configs: list[Any], recipe: DFSRecipe, family: str, task: str, dtype_name: str) -> Any:
    """The transformers config of the plain model: the output model's, with one layer per hop.

    Token ids come from the input model (whose tokenizer the output carries), as in the evo format;
    ``layer_types`` (if the sources have them) follow each hop's source layer.
    """
    import copy

    out_config = copy.deepcopy(configs[recipe.output_layer_model])
    in_config = configs[recipe.input_layer_model]
    hops = recipe.hops()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(out_config, name, getattr(in_config, name, None))
    out_config.tie_word_embeddings = bool(
        recipe.input_layer_model == recipe.output_layer_model and getattr(out_config, "tie_word_embeddings", False)
    )
    layer_types = [getattr(configs[m], "layer_types", None) for _, m, _ in hops]
    if any(types is not None for types in layer_types):
        out_config.layer_types = [
            types[l] if types is not None else "full_attention" for types, (_, _, l) in zip(layer_types, hops)
        ]
    out_config.num_hidden_layers = len(hops)
    out_config.architectures = [PLAIN_ARCHITECTURES[(family, task)]]
    for attr in ("auto_map", "_name_or_path"):
        if hasattr(out_config, attr):
            try:
                delattr(out_config, attr)
            except AttributeError:
                pass
    out_config.dtype = dtype_name
    return out_config


def add_legacy_rope_keys(config_file: Path) -> None:
    """Write ``rope_theta`` (and ``rope_scaling`` for scaled rope) beside transformers 5's
    ``rope_parameters``, so transformers 4.x reads the same rotary embedding (it ignores
    ``rope_parameters`` and would fall back to theta = 10000); transformers 5 accepts both."""
    data = json.loads(config_file.read_text(encoding="utf-8"))
    rope = data.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    if rope.get("rope_theta") is not None and "rope_theta" not in data:
        data["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and not data.get("rope_scaling"):
        data["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    atomic_write_text(config_file, json.dumps(data, indent=2, sort_keys=True) + "\n")


def norm_bound(eps: float, k: float, mean_square: float) -> float:
    """The per-RMSNorm relative deviation bound ``eps * |1 - k^-2| / (mean(x^2) + eps)``, ``k = c_t / c_0``
    (module docstring)."""
    return eps * abs(1.0 - 1.0 / (k * k)) / (mean_square + eps) if k > 0 and math.isfinite(k) else math.inf
