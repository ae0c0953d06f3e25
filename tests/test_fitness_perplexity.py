"""Perplexity evaluator: exact hand-computed values, padding invariance, weights, callbacks, errors."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch

from evomerge_opt.data.windows import TokenWindows
from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.perplexity import PerplexityEvaluator


class BigramLM(torch.nn.Module):
    """logits[t] = table[token_t]: a model whose probabilities we can compute by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def _windows(rows: list[list[int]], pad: int = 0, extra_pad: int = 0, name: str = "d") -> TokenWindows:
    width = max(map(len, rows)) + extra_pad
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return TokenWindows(ids, mask, name)


def _hand_nll(table: torch.Tensor, rows: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for row in rows:
        for prev, nxt in itertools.pairwise(row):
            logits = [float(v) for v in table[prev]]
            log_z = math.log(sum(math.exp(v) for v in logits))
            total += log_z - logits[nxt]
            count += 1
    return total, count


ROWS = [[1, 2, 3, 4, 5], [2, 2], [5, 4, 3], [1, 3, 5, 2, 4, 1, 1]]


def test_uniform_logits_give_vocab_size():
    table = torch.zeros(7, 7)
    result = PerplexityEvaluator([("d", _windows(ROWS), 1.0)], batch_size=2).evaluate(BigramLM(table))
    assert result.perplexity == pytest.approx(7.0, rel=1e-6)
    assert result.tokens == sum(len(r) - 1 for r in ROWS)


def test_matches_hand_computed_value_and_ignores_padding():
    table = torch.randn(7, 7, generator=torch.Generator().manual_seed(0)) * 2
    total, count = _hand_nll(table, ROWS)
    expected = math.exp(total / count)
    model = BigramLM(table)
    for batch_size in (1, 2, 3, 4):
        for pad, extra in ((0, 0), (6, 3)):  # the pad id and extra pad columns must not matter
            result = PerplexityEvaluator([("d", _windows(ROWS, pad, extra), 1.0)], batch_size=batch_size).evaluate(model)
            assert result.perplexity == pytest.approx(expected, rel=1e-6)
            assert result.loss == pytest.approx(total / count, rel=1e-6)
            assert result.per_dataset["d"].tokens == count


def test_real_model_padding_invariance(tiny_llama_family, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_family["ft0"]).eval()
    texts = ["the quick brown fox jumps over the lazy dog", "what is two plus three?", "the answer is five.",
             "the lazy dog", "fox"]
    rows = [tiny_tokenizer(t)["input_ids"] for t in texts]
    # Reference: each document alone, no padding at all, loss from the logits by hand.
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(torch.tensor([row])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            total -= float(sum(logp[t, row[t + 1]] for t in range(len(row) - 1)))
            count += len(row) - 1
    expected = math.exp(total / count)
    for batch_size in (1, 2, 5):
        result = PerplexityEvaluator([("d", _windows(rows, tiny_tokenizer.pad_token_id, 4), 1.0)],
                                     batch_size=batch_size).evaluate(model)
        assert result.perplexity == pytest.approx(expected, rel=1e-4)
        assert result.tokens == count and result.tokens_per_second > 0


def test_weighted_aggregate_and_breakdown():
    table = torch.randn(7, 7, generator=torch.Generator().manual_seed(1))
    a, b = ROWS[:2], ROWS[2:]
    la = _hand_nll(table, a)[0] / _hand_nll(table, a)[1]
    lb = _hand_nll(table, b)[0] / _hand_nll(table, b)[1]
    ev = PerplexityEvaluator([("a", _windows(a, name="a"), 1.0), ("b", _windows(b, name="b"), 3.0)], batch_size=1)
    result = ev.evaluate(BigramLM(table))
    assert result.per_dataset["a"].loss == pytest.approx(la, rel=1e-6)
    assert result.per_dataset["b"].perplexity == pytest.approx(math.exp(lb), rel=1e-6)
    assert result.loss == pytest.approx((la + 3 * lb) / 4, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp((la + 3 * lb) / 4), rel=1e-6)


def test_on_batch_running_values_pruning_and_max_batches():
    table = torch.randn(7, 7, generator=torch.Generator().manual_seed(2))
    ev = PerplexityEvaluator([("d", _windows(ROWS), 1.0)], batch_size=1)
    seen = []
    result = ev.evaluate(BigramLM(table), on_batch=lambda step, ppl: seen.append((step, ppl)))
    assert [s for s, _ in seen] == list(range(len(ROWS)))
    assert seen[-1][1] == pytest.approx(result.perplexity)

    class Pruned(Exception):
        pass

    def prune(step, ppl):
        if step == 1:
            raise Pruned

    model = BigramLM(table).train()
    with pytest.raises(Pruned):
        ev.evaluate(model, on_batch=prune)
    assert model.training  # the mode is restored even when the callback stops the run
    partial = ev.evaluate(BigramLM(table), max_batches=2)
    assert not partial.complete and partial.batches == 2 and partial.tokens < result.tokens


def test_batches_sorted_by_length_deterministically():
    ev = PerplexityEvaluator([("d", _windows(ROWS), 1.0)], batch_size=2)
    widths = [b.input_ids.shape[1] for b in ev.batches]
    assert widths == [7, 3]  # longest first, each batch trimmed to its longest row
    assert [b.rows.tolist() for b in ev.batches] == [[3, 0], [2, 1]]


def test_bad_configuration():
    w = _windows(ROWS)
    with pytest.raises(ConfigError, match="unique"):
        PerplexityEvaluator([("d", w, 1.0), ("d", w, 1.0)])
    with pytest.raises(ConfigError, match="weight > 0"):
        PerplexityEvaluator([("d", w, 0.0)])
    with pytest.raises(ConfigError, match="at least one"):
        PerplexityEvaluator([])
    with pytest.raises(ConfigError, match="no token to predict"):
        PerplexityEvaluator([("d", _windows([[1], [2]]), 1.0)])


def test_from_specs(tmp_path, tiny_llama_family, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["the quick brown fox", "the lazy dog"]))
    ev = PerplexityEvaluator.from_specs([{"path": str(path), "name": "e", "weight": 2.0}], tiny_tokenizer,
                                        batch_size=4, cache_dir=str(tmp_path / "c"))
    result = ev.evaluate(AutoModelForCausalLM.from_pretrained(tiny_llama_family["base"]))
    assert set(result.per_dataset) == {"e"} and math.isfinite(result.perplexity) and result.perplexity > 1


def test_head_fast_path_equals_full_logits(tiny_llama_family, tiny_tokenizer, monkeypatch):
    """Llama/Mistral run the head only on scored positions; the value equals the full-logits path."""
    from transformers import AutoModelForCausalLM

    from evomerge_opt.fitness import perplexity as ppl_mod

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_family["ft1"]).eval()
    rows = [tiny_tokenizer(t)["input_ids"] for t in ["the quick brown fox jumps", "two plus three", "the dog"]]
    ev = PerplexityEvaluator([("d", _windows(rows, tiny_tokenizer.pad_token_id, 2), 1.0)], batch_size=3)
    assert ppl_mod._plain_causal_lm(model)
    monkeypatch.setattr(ppl_mod, "_HEAD_CHUNK", 4)  # several head chunks
    fast = ev.evaluate(model)
    monkeypatch.setattr(ppl_mod, "_plain_causal_lm", lambda m: False)
    full = ev.evaluate(model)
    assert fast.loss == pytest.approx(full.loss, rel=1e-6) and fast.tokens == full.tokens
