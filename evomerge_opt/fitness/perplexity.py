"""Perplexity of a causal LM on tokenised windows: batched, pad-aware, exact token-weighted mean.

Per dataset ``d``: ``loss_d = sum_t nll_t / T_d`` over every real token that has a prediction (the
first token of a row has none; pad never counts), computed in float32 from the logits with
``cross_entropy(reduction="sum")``; ``ppl_d = exp(loss_d)``. The aggregate over datasets with weights
``w_d`` is ``exp(sum_d w_d loss_d / sum_d w_d)`` (a weighted geometric mean of perplexities).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from evomerge_opt.data.spec import DataSpec
from evomerge_opt.data.windows import TokenWindows, load_windows
from evomerge_opt.errors import ConfigError

logger = logging.getLogger(__name__)

OnBatch = Callable[[int, float], None]


@dataclass
class DatasetScore:
    perplexity: float
    loss: float
    tokens: int


@dataclass
class FitnessResult:
    """``perplexity``/``loss`` aggregate the datasets by weight; ``complete`` is False after ``max_batches``."""

    perplexity: float
    loss: float
    per_dataset: dict[str, DatasetScore]
    tokens: int
    seconds: float
    tokens_per_second: float
    complete: bool = True
    batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Batch:
    dataset: int
    input_ids: torch.Tensor  # [b, L_batch] (trimmed to the batch's longest row)
    attention_mask: torch.Tensor  # [b, L_batch] bool
    rows: torch.Tensor = field(repr=False)  # original row indices (for debugging)


def _aggregate(losses: Sequence[float], weights: Sequence[float]) -> float:
    return sum(w * l for w, l in zip(weights, losses)) / sum(weights)


def _safe_exp(value: float) -> float:
    """``exp`` that gives inf instead of raising on overflow (NaN stays NaN)."""
    return float("inf") if value > 700 else math.exp(value)


class PerplexityEvaluator:
    """Scores models on fixed datasets; the batches are built once and reused for every model.

    ``datasets``: ``(name, windows, weight)`` triples. Rows are sorted by length (longest first, ties
    by row index, so the order is deterministic) and cut into batches of ``batch_size``, each trimmed to
    its longest row, which keeps padding small. Batches of the datasets are interleaved in proportion
    to their counts so the running estimate handed to ``on_batch`` covers every dataset early.
    """

    def __init__(
        self,
        datasets: Sequence[tuple[str, TokenWindows, float]],
        batch_size: int = 8,
        device: str | torch.device | None = None,
    ) -> None:
        if not datasets:
            raise ConfigError("The perplexity evaluator needs at least one dataset, but got none.")
        if batch_size < 1:
            raise ConfigError(f"`batch_size >= 1` must hold, but got batch_size={batch_size}.")
        names = [name for name, _, _ in datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"Dataset names must be unique, but {duplicates} appear more than once; set `name:`.")
        for name, windows, weight in datasets:
            if not weight > 0:
                raise ConfigError(f"`weight > 0` must hold, but got weight={weight} for dataset {name!r}.")
            if windows.num_predicted == 0:
                raise ConfigError(f"Dataset {name!r} has no token to predict (every row is shorter than 2 tokens).")
        self.names = names
        self.weights = [float(w) for _, _, w in datasets]
        self.windows = [w for _, w, _ in datasets]
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.batches = self._make_batches()

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[DataSpec | dict[str, Any] | str],
        tokenizer: Any,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        cache_dir: str | None = None,
    ) -> PerplexityEvaluator:
        parsed = [DataSpec.parse(s) for s in specs]
        return cls([(s.name or f"data{i}", load_windows(s, tokenizer, cache_dir), s.weight)
                    for i, s in enumerate(parsed)], batch_size=batch_size, device=device)

    @property
    def num_tokens(self) -> int:
        """Predicted tokens over all datasets (what one full evaluation scores)."""
        return sum(w.num_predicted for w in self.windows)

    def _make_batches(self) -> list[_Batch]:
        per_dataset: list[list[_Batch]] = []
        for index, windows in enumerate(self.windows):
            lengths = windows.lengths
            # Stable sort: longest first, ties by original row index.
            order = sorted(range(windows.num_rows), key=lambda r: (-int(lengths[r]), r))
            batches = []
            for start in range(0, len(order), self.batch_size):
                rows = torch.tensor(order[start : start + self.batch_size], dtype=torch.long)
                width = int(lengths[rows].max())
                batches.append(_Batch(index, windows.input_ids[rows, :width],
                                      windows.attention_mask[rows, :width].bool(), rows))
            per_dataset.append(batches)
        # Interleave: batch j of dataset d sits at fraction (j + 0.5) / n_d of the run.
        keyed = [((j + 0.5) / len(batches), d, batch)
                 for d, batches in enumerate(per_dataset) for j, batch in enumerate(batches)]
        keyed.sort(key=lambda item: (item[0], item[1]))
        return [batch for _, _, batch in keyed]

    @staticmethod
    def _model_device(model: torch.nn.Module) -> torch.device:
        for param in model.parameters():
            return param.device
        return torch.device("cpu")

    def evaluate(
        self,
        model: torch.nn.Module,
        on_batch: OnBatch | None = None,
        max_batches: int | None = None,
    ) -> FitnessResult:
        """Score ``model``. ``on_batch(step, running_perplexity)`` runs after every batch; what it raises
        (e.g. ``optuna.TrialPruned``) propagates. ``max_batches`` stops early (``complete=False``)."""
        device = self.device or self._model_device(model)
        sums = [0.0] * len(self.windows)  # float64 accumulators of summed NLL
        counts = [0] * len(self.windows)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        steps = 0
        try:
            with torch.inference_mode():
                for step, batch in enumerate(self.batches):
                    if max_batches is not None and step >= max_batches:
                        break
                    nll, count = self._batch_nll(model, batch, device)
                    sums[batch.dataset] += nll
                    counts[batch.dataset] += count
                    steps = step + 1
                    if on_batch is not None:
                        seen = [i for i, c in enumerate(counts) if c]
                        running = _aggregate([sums[i] / counts[i] for i in seen], [self.weights[i] for i in seen])
                        on_batch(step, _safe_exp(running))
        finally:
            if was_training:
                model.train()
        seconds = time.perf_counter() - start
        per_dataset = {}
        for i, name in enumerate(self.names):
            if counts[i]:
                loss = sums[i] / counts[i]
                per_dataset[name] = DatasetScore(_safe_exp(loss), loss, counts[i])
        seen = [i for i, c in enumerate(counts) if c]
        loss = _aggregate([sums[i] / counts[i] for i in seen], [self.weights[i] for i in seen]) if seen else math.nan
        tokens = sum(counts)
        if not math.isfinite(loss):
            logger.warning("non-finite loss %s: the model produces NaN/inf logits", loss)
        return FitnessResult(
            perplexity=_safe_exp(loss),
            loss=loss,
            per_dataset=per_dataset,
            tokens=tokens,
            seconds=seconds,
            tokens_per_second=tokens / seconds if seconds > 0 else math.inf,
            complete=steps == len(self.batches),
            batches=steps,
        )

    @staticmethod
    def _batch_nll(model: torch.nn.Module, batch: _Batch, device: torch.device) -> tuple[float, int]:
        """Summed NLL (float64) and token count of one batch."""
        input_ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        targets = input_ids[:, 1:]  # token t+1 is predicted from position t
        scored = mask[:, 1:] & mask[:, :-1]  # [b, L-1]: real target with a real context
        count = int(scored.sum())
        if _plain_causal_lm(model):
            # The head runs only on the scored positions: no [b, L, V] logits, no head FLOPs on pad.
            hidden = model.model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
            states = hidden[:, :-1][scored]  # [T, H]
            labels = targets[scored]  # [T]
            total = torch.zeros((), dtype=torch.float64, device=device)
            for start in range(0, states.shape[0], _HEAD_CHUNK):
                logits = model.lm_head(states[start : start + _HEAD_CHUNK]).float()  # [chunk, V]
                total += F.cross_entropy(logits, labels[start : start + _HEAD_CHUNK], reduction="sum").double()
            return float(total), count
        out = model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]  # [b, L, V]
        total = torch.zeros((), dtype=torch.float64, device=device)
        # Row by row so the float32 copy of the logits stays at one row's [L, V].
        for row in range(logits.shape[0]):
            keep = scored[row]
            if not bool(keep.any()):
                continue
            row_logits = logits[row, :-1][keep].float()  # [T_row, V]
            total += F.cross_entropy(row_logits, targets[row][keep], reduction="sum").double()
        return float(total), count


# Rows of hidden states sent through the head at once (bounds the float32 logits at chunk x V).
_HEAD_CHUNK = 1024
# Causal LMs whose logits are exactly `lm_head(model(...).last_hidden_state)` (no softcapping/scaling).
_PLAIN_CAUSAL_LMS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def _plain_causal_lm(model: torch.nn.Module) -> bool:
    return (
        type(model).__name__ in _PLAIN_CAUSAL_LMS
        and isinstance(getattr(model, "lm_head", None), torch.nn.Linear)
        and hasattr(model, "model")
    )
