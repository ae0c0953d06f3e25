"""Batched greedy generation with the KV cache, for fitness (and a throughput check against ``generate``).

:func:`greedy_generate` decodes a batch of prompts greedily:

* the batch is left-padded with ``position_ids`` over the real tokens (Hugging Face's layout), one
  prefill forward with the head on the last position only, then one token per step through the model's
  own cache (``DynamicCache``; the DFS wrappers index it by hop), so it works for plain, PS-merged, DFS
  and PS+DFS candidates alike;
* a row ends at an EOS token (the generation config's and the tokenizer's) or when one of the ``stop``
  strings appears in its decoded text; finished rows leave the batch (``cache.batch_select_indices``),
  so a batch costs what its live rows cost;
* the text of a row is its generated tokens decoded (special tokens skipped) and cut at the earliest
  stop string, which is exactly "generate ``max_new_tokens`` then cut at the stop string" (decoding is
  greedy and stopping only saves the tail).

``use_cache=False`` re-runs the whole sequence each step (the reference the cached path must equal).
:func:`generation_throughput` times it against a plain ``model.generate`` loop on the same prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evomerge_opt.fitness.extract import cut_at_stop
from evomerge_opt.fitness.forward import eos_ids, forward_last, left_pad, model_device, pad_id_of, positions


@dataclass
class Generation:
    """Per prompt (input order): generated ``tokens`` (EOS excluded), decoded ``texts`` (cut at stop)."""

    tokens: list[list[int]]
    texts: list[str]
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    finite: bool = True
    seconds: float = 0.0


def _tail_has_stop(tokenizer: Any, tokens: list[int], stop: Sequence[str], tail: int) -> bool:
    text = tokenizer.decode(tokens[-tail:], skip_special_tokens=True)
    return any(s and s in text for s in stop)


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    device: torch.device | None = None,
    use_cache: bool = True,
) -> Generation:
    """Greedy continuations of one batch of tokenised prompts (see the module docstring)."""
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens >= 1` must hold, but got {max_new_tokens}.")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = device or model_device(model)
    eos = set(eos_token_ids if eos_token_ids is not None else eos_ids(model, tokenizer))
    pad = pad_id_of(tokenizer)
    # A stop string ends inside the last `tail` tokens (a token decodes to at least one byte; +2 for
    # characters split over tokens).
    tail = max((len(s.encode("utf-8")) for s in stop), default=0) + 2
    start = time.perf_counter()
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # prompt index of each row still generating
    ids, mask = left_pad(prompts, pad, device)  # [b, L]
    pos = positions(mask)
    logits, cache = forward_last(model, ids, mask, pos, 1, use_cache=use_cache)
    last_pos = pos[:, -1]  # [b]
    finite = True
    steps = 0
    for step in range(max_new_tokens):
        step_logits = logits[:, -1]  # [b_live, V]
        finite = finite and bool(torch.isfinite(step_logits).all())
        next_tokens = step_logits.argmax(-1)  # [b_live]
        steps = step + 1
        keep = []
        for j, token in enumerate(next_tokens.tolist()):
            row = live[j]
            if token in eos:
                continue
            out[row].append(token)
            if stop and _tail_has_stop(tokenizer, out[row], stop, tail):
                continue
            keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            next_tokens, mask, last_pos = next_tokens[index], mask[index], last_pos[index]
            ids = ids[index]
            if cache is not None:
                cache.batch_select_indices(index)
            live = [live[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        last_pos = last_pos + 1
        if use_cache:
            logits, cache = forward_last(model, next_tokens[:, None], mask, last_pos[:, None], 1,
                                         past_key_values=cache, use_cache=True)
        else:
            ids = torch.cat([ids, next_tokens[:, None]], dim=1)
            logits, _ = forward_last(model, ids, mask, positions(mask), 1)
    texts = [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stop) for t in out]
    return Generation(tokens=out, texts=texts, prompt_tokens=sum(len(p) for p in prompts),
                      new_tokens=sum(len(t) for t in out), steps=steps, finite=finite,
                      seconds=time.perf_counter() - start)


def greedy_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    eos_token_ids: Sequence[int] | None = None,
    device: torch.device | None = None,
    use_cache: bool = True,
) -> Generation:
    """:func:`generate_batch` over consecutive batches of ``batch_size`` prompts (input order kept)."""
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(prompts), batch_size):
            parts.append(generate_batch(model, tokenizer, prompts[start:start + batch_size], max_new_tokens, stop,
                                        eos_token_ids, device, use_cache))
    finally:
        if was_training:
            model.train()
    return Generation(
        tokens=[t for p in parts for t in p.tokens], texts=[t for p in parts for t in p.texts],
        prompt_tokens=sum(p.prompt_tokens for p in parts), new_tokens=sum(p.new_tokens for p in parts),
        steps=sum(p.steps for p in parts), finite=all(p.finite for p in parts),
        seconds=sum(p.seconds for p in parts),
    )


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                batch_size: int = 1, eos_token_ids: Sequence[int] | None = None,
                device: torch.device | None = None, use_cache: bool = True) -> Generation:
    """The reference: ``model.generate(do_sample=False)`` on left-padded batches of ``batch_size`` prompts.

    Tokens after a row's first EOS are dropped (``generate`` pads finished rows)."""
    device = device or model_device(model)
    eos = list(eos_token_ids if eos_token_ids is not None else eos_ids(model, tokenizer))
    pad = pad_id_of(tokenizer)
    start = time.perf_counter()
    tokens: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first:first + batch_size]
        ids, mask = left_pad(chunk, pad, device)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   num_beams=1, eos_token_id=eos or None, pad_token_id=pad, use_cache=use_cache,
                                   temperature=None, top_p=None, top_k=None)
        for row in generated[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            tokens.append(row[:cut])
    seconds = time.perf_counter() - start
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return Generation(tokens=tokens, texts=texts, prompt_tokens=sum(len(p) for p in prompts),
                      new_tokens=sum(len(t) for t in tokens), seconds=seconds)


def device_is_cuda(model: torch.nn.Module) -> bool:
    return model_device(model).type == "cuda"


def generation_throughput(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32,
                          batch_size: int = 8, repeats: int = 3, chat: bool = False,
                          eos_token_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Tokens/s of :func:`greedy_generate` against plain ``model.generate`` on the same prompts.

    Three ways, interleaved ``repeats`` times (A/B/C, B/C/A, ...) so drift on a shared machine hits each
    alike: ours batched, ``model.generate`` on the same left-padded batches, ``model.generate`` one
    prompt at a time (the plain loop). Returns best-of-repeats seconds and generated tokens/s per way,
    the ratios (wall and CPU time of this process), and ``agree``: the fraction of prompts where ours
    writes exactly the tokens of the one-at-a-time loop (batching/padding may flip near-ties in low
    precision)."""
    from evomerge_opt.fitness.forward import encode, render_prompt

    ids = [encode(tokenizer, render_prompt(tokenizer, p, chat), chat) for p in prompts]
    # ``eos_token_ids=[]``: every row decodes exactly max_new_tokens (pure decoding speed).
    eos = list(eos_token_ids) if eos_token_ids is not None else eos_ids(model, tokenizer)
    ways = {
        "ours_batched": lambda: greedy_generate(model, tokenizer, ids, max_new_tokens, (), batch_size, eos),
        "hf_generate_batched": lambda: hf_generate(model, tokenizer, ids, max_new_tokens, batch_size, eos),
        "hf_generate_loop": lambda: hf_generate(model, tokenizer, ids, max_new_tokens, 1, eos),
    }
    names = list(ways)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    cpu_seconds: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, Generation] = {}
    model.eval()
    ways["ours_batched"]()  # warm-up (first-call allocations, lazy imports)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            cpu = time.process_time()
            wall = time.perf_counter()
            result = ways[name]()
            if device_is_cuda(model):
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - wall)
            cpu_seconds[name].append(time.process_time() - cpu)
            outputs[name] = result
    report: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                              "repeats": repeats}
    for name in names:
        best, best_cpu, new = min(seconds[name]), min(cpu_seconds[name]), outputs[name].new_tokens
        report[name] = {"seconds": best, "cpu_seconds": best_cpu, "new_tokens": new,
                        "tokens_per_second": new / best if best > 0 else float("inf"),
                        "tokens_per_cpu_second": new / best_cpu if best_cpu > 0 else float("inf")}
    ours, ours_cpu = report["ours_batched"]["tokens_per_second"], report["ours_batched"]["tokens_per_cpu_second"]
    for key, other in (("hf_batched", "hf_generate_batched"), ("hf_loop", "hf_generate_loop")):
        report[f"speedup_vs_{key}"] = ours / report[other]["tokens_per_second"]
        report[f"cpu_speedup_vs_{key}"] = ours_cpu / report[other]["tokens_per_cpu_second"]
    reference = outputs["hf_generate_loop"].tokens
    report["agree"] = sum(a == b for a, b in zip(outputs["ours_batched"].tokens, reference)) / max(1, len(prompts))
    return report
