"""Tiny causal-LM training on CPU, deterministic: pre-training of ``base`` and the two fine-tunes.

Texts are tokenised (each starts with ``<|endoftext|>``, the BOS the tokenizer adds), concatenated and
cut into windows of ``seq_len`` tokens (packing: no padding is wasted). A step draws a fixed number of
rows from each stream of a mixture (e.g. 90% arithmetic, 10% English) with a seeded ``torch.Generator``,
so the same settings give the same batches and, with ``torch.use_deterministic_algorithms``, the same
weights bit for bit on the same machine and torch version.

``trainable`` picks what a fine-tune may change: ``all``; ``embeddings`` (the tied embedding matrix
only: the new words of the made-up language are learned *into the base model's body*, which is what
keeps the two specialists' task vectors composable); ``lower:N`` (embeddings + the first N decoder
layers); ``upper:N`` (the last N decoder layers + final norm).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class Stream:
    """Packed training windows ``[n, seq_len]`` and the fraction of each batch drawn from them."""

    windows: torch.Tensor
    fraction: float


def pack(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` int64 windows of the concatenated tokenised ``texts`` (the tail is dropped)."""
    ids: list[int] = []
    for start in range(0, len(texts), 512):
        for row in tokenizer(list(texts[start : start + 512]))["input_ids"]:
            ids.extend(row)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens: not one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def select_trainable(model: torch.nn.Module, trainable: str) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` per ``trainable`` (see module docstring); return the trainable parameters."""
    layers = model.model.layers
    n_layers = len(layers)
    names: set[str] = set()
    if trainable == "all":
        chosen = [p for _, p in model.named_parameters()]
    else:
        kind, _, count = trainable.partition(":")
        k = int(count or 0)
        if kind in ("embeddings", "lower"):
            names.add("model.embed_tokens.weight")
            names.update(f"model.layers.{i}." for i in range(min(k, n_layers)))
            if not model.config.tie_word_embeddings:
                names.add("lm_head.weight")
        elif kind == "upper":
            names.update(f"model.layers.{i}." for i in range(max(0, n_layers - k), n_layers))
            names.add("model.norm.weight")
        else:
            raise ValueError(f"unknown trainable {trainable!r}; use all, embeddings, lower:N or upper:N")
        chosen = [p for name, p in model.named_parameters() if any(name.startswith(x) for x in names)]
    chosen_ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen_ids)
    return chosen


def train_lm(
    model: torch.nn.Module,
    streams: Sequence[Stream],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    trainable: str = "all",
    warmup: int = 20,
    weight_decay: float = 0.0,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place with AdamW and a cosine schedule; return the loss of every step."""
    from tqdm.auto import tqdm

    params = select_trainable(model, trainable)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    counts = _rows_per_stream(streams, batch_size)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        scale = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        rows = [
            s.windows[torch.randint(len(s.windows), (c,), generator=generator)]
            for s, c in zip(streams, counts, strict=True)
            if c
        ]
        batch = torch.cat(rows)  # [batch_size, seq_len]
        out = model(input_ids=batch, labels=batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(out.loss.detach()))
        if step % 25 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    logger.info("%s: %d steps, loss %.3f -> %.3f", desc, steps, losses[0], sum(losses[-10:]) / min(10, len(losses)))
    return losses


def _rows_per_stream(streams: Sequence[Stream], batch_size: int) -> list[int]:
    total = sum(s.fraction for s in streams)
    counts = [round(batch_size * s.fraction / total) for s in streams]
    counts[0] += batch_size - sum(counts)  # the first stream takes the rounding remainder
    return counts
