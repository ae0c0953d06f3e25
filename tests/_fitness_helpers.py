"""Helpers of the fitness tests: a scripted causal LM (writes known text), record files, tiny prompts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

# Prompts made of the tiny tokenizer's training words (tests/conftest.py), so they tokenise to few tokens.
TINY_PROMPTS = [
    "the quick", "what is two", "the lazy dog", "jumps over the", "the answer is", "brown fox", "what is",
    "two plus three", "the dog", "over the lazy", "the fox jumps", "quick brown", "is five", "the answer",
    "lazy", "three plus two is",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


class _ScriptCache:
    """Per-row token histories standing in for a KV cache (same batch API as transformers' caches)."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in indices.tolist()]


class ScriptedLM(torch.nn.Module):
    """A causal LM that writes a fixed continuation after each known prompt, then EOS.

    ``scripts``: prompt token ids -> token ids to write. Works with and without a cache and with left
    padding (the real tokens of a row are where ``attention_mask`` is 1), like a real model.
    """

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], vocab_size: int, eos_id: int) -> None:
        super().__init__()
        self.scripts = scripts
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.generation_config = SimpleNamespace(eos_token_id=eos_id)
        self.calls = 0

    def _next(self, history: list[int]) -> int:
        for prompt, script in self.scripts.items():
            n = len(prompt)
            if tuple(history[:n]) == prompt:
                written = len(history) - n
                return script[written] if written < len(script) else self.eos_id
        raise AssertionError(f"unknown prompt {history}")

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep=0):
        self.calls += 1
        if past_key_values is None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]
            cache = _ScriptCache(rows)
        else:
            cache = past_key_values
            for row, token in zip(cache.rows, input_ids[:, -1].tolist()):
                row.append(token)
        keep = logits_to_keep or input_ids.shape[1]
        logits = torch.zeros((input_ids.shape[0], keep, self.vocab_size))
        for r, history in enumerate(cache.rows):
            logits[r, -1, self._next(history)] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=cache if use_cache else None)


def digit_tokenizer():
    """The zoo's tokenizer (digits one per token, BOS in front) trained on a few sentences."""
    from evomerge_opt.zoo.tokenizer import train_tokenizer

    text = ["the answer is 42.", "i think it is 7 or 8", "no idea at all", "it costs 1,000 dollars", "total: -3",
            "the result is 12\nand then 99", "answer: paris", "The Answer Is Yes"] * 5
    return train_tokenizer(text, vocab_size=300)
