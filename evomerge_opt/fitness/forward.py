"""Model calls shared by the accuracy metrics and generation: left-padded batches, last-position logits,
teacher-forced continuation scores, and prompt encoding.

Every batch is LEFT-padded (the real tokens end at the last column) with ``position_ids`` counted over
the real tokens, exactly as Hugging Face generation lays out a batch; the head then runs only on the
last ``K`` positions (``logits_to_keep=K``), never on the prompt, so a 150k-vocabulary head costs
``b x K x V`` instead of ``b x L x V``. Models whose ``forward`` takes no ``logits_to_keep`` get full
logits, sliced.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

# Elements of float32 log-probabilities materialised at once (rows x K x V) when scoring continuations.
_LOGPROB_CHUNK = 1 << 24
_KEEPS_LOGITS: dict[type, bool] = {}


def model_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def pad_id_of(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[b, L]`` (long), each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """``position_ids`` ``[b, L]``: 0 at each row's first real token (pad positions get 0; they are masked)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    cls = type(model)
    if cls not in _KEEPS_LOGITS:
        try:
            _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            _KEEPS_LOGITS[cls] = False
    return _KEEPS_LOGITS[cls]


def forward_last(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, keep: int, past_key_values: Any = None,
                 use_cache: bool = False) -> tuple[torch.Tensor, Any]:
    """Logits of the last ``keep`` positions ``[b, keep, V]`` (model dtype) and the cache (or None)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                              "position_ids": position_ids, "use_cache": use_cache}
    if past_key_values is not None:
        kwargs["past_key_values"] = past_key_values
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.shape[1] != keep:
        logits = logits[:, -keep:]
    return logits, (getattr(out, "past_key_values", None) if use_cache else None)


def score_continuations(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    device: torch.device,
    logprobs: bool = True,
) -> tuple[list[float], list[bool], bool]:
    """Teacher-forced scores of ``(context_ids, continuation_ids)`` rows in ONE forward pass.

    Returns per row the summed log-probability of the continuation tokens (float32 log-softmax; 0.0
    when ``logprobs`` is off), whether every continuation token is the arg-max given everything before
    it (what greedy decoding after the context would write), and whether all scored logits are finite.
    The input is ``(context + continuation)[:-1]``, so the last ``c`` positions of a row predict its
    ``c`` continuation tokens (lm-eval's layout, left- instead of right-padded).
    """
    lengths = [len(c) for _, c in rows]
    if min(lengths) < 1:
        raise ValueError("every continuation must have at least one token")
    keep = max(lengths)
    inputs = [list(ctx) + list(cont[:-1]) for ctx, cont in rows]
    ids, mask = left_pad(inputs, pad_id, device)
    logits, _ = forward_last(model, ids, mask, positions(mask), keep)  # [b, K, V]
    # Targets right-aligned like the logits: row r's continuation sits in its last c_r columns.
    targets = torch.zeros((len(rows), keep), dtype=torch.long)
    valid = torch.zeros((len(rows), keep), dtype=torch.bool)
    for r, (_, cont) in enumerate(rows):
        targets[r, keep - len(cont):] = torch.as_tensor(list(cont), dtype=torch.long)
        valid[r, keep - len(cont):] = True
    targets, valid = targets.to(device), valid.to(device)
    finite = bool(torch.isfinite(logits).all())
    greedy = ((logits.argmax(-1) == targets) | ~valid).all(-1).tolist()  # [b]
    sums = [0.0] * len(rows)
    if logprobs:
        vocab = logits.shape[-1]
        step = max(1, _LOGPROB_CHUNK // max(1, keep * vocab))
        out = []
        for start in range(0, len(rows), step):
            block = logits[start:start + step].float()  # [s, K, V]
            picked = block.gather(-1, targets[start:start + step, :, None])[..., 0]  # [s, K]
            logp = picked - torch.logsumexp(block, dim=-1)
            out.append((logp * valid[start:start + step]).sum(-1).double())
        sums = torch.cat(out).tolist()
    return sums, [bool(g) for g in greedy], finite


# ------------------------------------------------------------------------------------------- prompts


def render_prompt(tokenizer: Any, prompt: str, chat: bool) -> str:
    """The prompt as text: with ``chat``, one user turn through the tokenizer's chat template plus the
    generation prompt (the template writes BOS and turn markers itself)."""
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of a (rendered) prompt: the tokenizer's usual special tokens for plain text (none when
    the text already starts with BOS, as lm-eval does), none for chat-rendered text."""
    add_special = not chat
    bos = getattr(tokenizer, "bos_token", None)
    if add_special and bos and text.startswith(bos):
        add_special = False
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str, chat: bool) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for causal models: trailing whitespace of the context moves to the
    continuation; ``whole = enc(context + continuation)``, ``context = enc(context)``, the continuation is
    ``whole[len(context):]``. An empty context is the BOS (else EOS) token, as lm-eval's prefix token."""
    if not context:
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        prefix = getattr(tokenizer, "bos_token_id", None)
        if prefix is None:
            prefix = getattr(tokenizer, "eos_token_id", None)
        if prefix is None:
            raise ValueError("an empty prompt needs a BOS or EOS token to condition on")
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [int(prefix)], cont
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode(tokenizer, context + continuation, chat)
    ctx = encode(tokenizer, context, chat)
    return ctx, whole[len(ctx):]


def eos_ids(model: torch.nn.Module | None, tokenizer: Any) -> list[int]:
    """Token ids that end a generation: the model's generation config's EOS ids and the tokenizer's."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None) if model is not None else None
    value = getattr(config, "eos_token_id", None) if config is not None else None
    if value is not None:
        ids.extend([value] if isinstance(value, int) else list(value))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.append(int(tok_eos))
    return sorted({int(i) for i in ids})


def continuation_tokens(tokenizer: Any, prompt_ids: list[int], prompt_text: str, target: str,
                        chat: bool) -> list[int]:
    """The tokens greedy decoding must write after ``prompt_ids`` to produce ``target``.

    ``enc(prompt + target)`` minus the prompt's tokens when the prompt's tokens are its prefix (the
    usual case: the target starts a new word); otherwise the target encoded alone (no special tokens).
    """
    whole = encode(tokenizer, prompt_text + target, chat)
    if whole[: len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
        return whole[len(prompt_ids):]
    return list(tokenizer(target, add_special_tokens=False)["input_ids"])
