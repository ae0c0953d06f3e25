"""Text report of a constructed model: config, tokenizer summary, parameter counts per module group."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

GROUPS = ("embeddings", "attention", "mlp", "norms", "head", "routing", "other")


def param_group(name: str) -> str:
    """Module group of a parameter name (Llama/Mistral names and the DFS wrappers' names).

    ``model.layers.0.self_attn.q_proj.weight`` -> attention, ``...mlp.up_proj.weight`` -> mlp,
    ``...input_layernorm.weight`` / ``model.norm.weight`` -> norms, ``model.embed_tokens.weight`` ->
    embeddings, ``lm_head.weight`` / ``score.weight`` -> head, the DFS wrappers' per-hop scaling and bias
    (``model.hops.N.scale``) -> routing; anything else -> other. A norm inside attention (q_norm) is a norm.
    """
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else parts[0]
    if parts[0] in ("lm_head", "score") or module in ("lm_head", "score"):
        return "head"
    if any(p in ("embed_tokens", "wte", "wpe", "embeddings", "embed_positions") for p in parts):
        return "embeddings"
    if "norm" in module.lower() or "ln_" in module.lower():
        return "norms"
    if any(p in ("self_attn", "attn", "attention", "cross_attn") for p in parts):
        return "attention"
    if any(p in ("mlp", "feed_forward", "ffn") for p in parts):
        return "mlp"
    if "hops" in parts:
        return "routing"
    return "other"


@dataclass
class ParamCounts:
    groups: dict[str, int]
    total: int
    trainable: int
    tied: list[tuple[str, str]]  # (alias, canonical)
    buffers: int  # elements in persistent buffers

    def lines(self) -> list[str]:
        out = ["Parameters (tied weights counted once):"]
        for group in GROUPS:
            count = self.groups.get(group, 0)
            if count or group not in ("routing", "other"):
                share = 100.0 * count / self.total if self.total else 0.0
                out.append(f"  {group:<11} {count:>15,}  {share:5.1f}%")
        out.append(f"  {'total':<11} {self.total:>15,}")
        if self.trainable != self.total:
            out.append(f"  {'trainable':<11} {self.trainable:>15,}")
        for alias, canonical in self.tied:
            out.append(f"  tied: {alias} -> {canonical}")
        if self.buffers:
            out.append(f"  persistent buffers: {self.buffers:,} elements")
        return out


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    """Per-group parameter counts; a tensor shared under several names (tied weights) counts once."""
    groups = dict.fromkeys(GROUPS, 0)
    seen: dict[int, str] = {}
    tied: list[tuple[str, str]] = []
    total = trainable = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.append((name, seen[id(param)]))
            continue
        seen[id(param)] = name
        groups[param_group(name)] += param.numel()
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    param_ids = set(seen)
    buffers = sum(t.numel() for t in model.state_dict(keep_vars=True).values() if id(t) not in param_ids)
    return ParamCounts(groups, total, trainable, tied, buffers)


# Keys of a HF config that say nothing about the model itself.
_NOISE = {"transformers_version", "_name_or_path", "id2label", "label2id", "return_dict", "output_hidden_states",
          "output_attentions", "torchscript", "chunk_size_feed_forward", "problem_type", "tf_legacy_loss",
          "pruned_heads", "use_bfloat16", "_commit_hash", "is_encoder_decoder", "tie_encoder_decoder",
          "add_cross_attention", "cross_attention_hidden_size", "finetuning_task", "task_specific_params",
          "architectures"}


def config_lines(config: Any) -> list[str]:
    """``key: value`` lines of a HF config (sorted, JSON values), without bookkeeping keys."""
    data = config.to_dict()
    out = [f"Config ({type(config).__name__}, model_type={data.get('model_type')!r}):"]
    for key in sorted(data):
        if key in _NOISE or key.startswith("_") or key == "model_type":
            continue
        value = data[key]
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        text = json.dumps(value, default=str)
        if len(text) > 200:
            text = text[:197] + "..."
        out.append(f"  {key}: {text}")
    return out


def tokenizer_lines(tokenizer: Any, vocab_size: int | None) -> list[str]:
    """Class, sizes, special tokens and chat template of ``tokenizer`` (or a line saying there is none)."""
    if tokenizer is None:
        return ["Tokenizer: none (give a model directory with tokenizer files or `tokenizer:` in the config)"]
    out = [f"Tokenizer: {type(tokenizer).__name__}"]
    out.append(f"  vocabulary: {len(tokenizer):,} tokens (base {tokenizer.vocab_size:,})")
    for role in ("bos", "eos", "pad", "unk"):
        token = getattr(tokenizer, f"{role}_token", None)
        if token is not None:
            out.append(f"  {role}_token: {token!r} (id {getattr(tokenizer, f'{role}_token_id', None)})")
    max_len = getattr(tokenizer, "model_max_length", None)
    if max_len is not None and max_len < 1e12:
        out.append(f"  model_max_length: {max_len}")
    out.append(f"  chat template: {'yes' if getattr(tokenizer, 'chat_template', None) else 'no'}")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        out.append(
            f"  WARNING: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "ids >= vocab_size would fail in the embedding."
        )
    return out
