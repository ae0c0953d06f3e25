"""``metric: choice``: multiple choice by log-likelihood, as lm-evaluation-harness's ``acc``/``acc_norm``.

Per question: context = the prompt, continuation ``i`` = ``target_delimiter + choices[i]`` (default " "),
encoded as lm-eval encodes a pair (the context's trailing whitespace moves to the continuation; the
continuation's tokens are ``enc(context + continuation)`` after ``enc(context)``); ``ll_i`` = summed
log-probability of continuation ``i``'s tokens, all choices of a batch of questions in one forward pass.
The prediction is ``argmax_i ll_i`` (``normalize: none``, lm-eval's ``acc``), ``argmax_i ll_i / len(choice_i)``
in characters (``normalize: length``, lm-eval's ``acc_norm``) or in UTF-8 bytes (``normalize: bytes``,
lm-eval's ``acc_bytes``); the first maximum wins ties (numpy's ``argmax``). The label is an index into the
choices or the text of one of them.
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge_opt.fitness.forward import encode_pair, pad_id_of, render_prompt, score_continuations
from evomerge_opt.fitness.metrics._base import METRICS, BatchStats, Metric
from evomerge_opt.fitness.metrics._records_common import as_text, require_chat_template

CHOICE_NORMALIZE = ("none", "length", "bytes")


def label_index(label: Any, choices: list[str]) -> int | None:
    """The label as an index into ``choices`` (None when it is not a valid one)."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label if 0 <= label < len(choices) else None
    if isinstance(label, float) and label.is_integer():
        return label_index(int(label), choices)
    if isinstance(label, str):
        if label in choices:
            return choices.index(label)
        if label.strip().lstrip("-").isdigit():
            return label_index(int(label.strip()), choices)
    return None


@METRICS.register("choice")
class ChoiceMetric(Metric):
    name = "choice"
    kind = "accuracy"
    direction = "maximize"
    spec_keys = frozenset({"prompt_field", "choices_field", "label_field", "target_delimiter", "normalize", "chat"})

    @classmethod
    def check_spec(cls, spec) -> list[str]:
        if spec.normalize is not None and (not isinstance(spec.normalize, str) or spec.normalize not in CHOICE_NORMALIZE):
            return [(f"`normalize` for metric choice is one of {', '.join(CHOICE_NORMALIZE)} (length = lm-eval's "
                     f"acc_norm), but got {spec.normalize!r}.")]
        return []

    @classmethod
    def check_records(cls, spec, records: list[dict[str, Any]]) -> list[str]:
        from evomerge_opt.fitness.records import listed, missing_field_problems

        problems = missing_field_problems(spec, records, {"prompt_field": spec.prompt_field,
                                                          "choices_field": spec.choices_field,
                                                          "label_field": spec.label_field})
        if problems:
            return problems
        bad_choices, bad_labels, empty = [], [], []
        for i, record in enumerate(records):
            choices = record[spec.choices_field]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                bad_choices.append(i)
                continue
            if spec.normalize in ("length", "bytes") and any(not c for c in choices):
                empty.append(i)
            if label_index(record[spec.label_field], choices) is None:
                bad_labels.append(i)
        if bad_choices:
            problems.append(f"dataset {spec.name!r}: field {spec.choices_field!r} must hold a list of at least 2 "
                            f"strings, but records {listed(bad_choices)} do not "
                            f"(e.g. {records[bad_choices[0]][spec.choices_field]!r}).")
        if bad_labels:
            first = records[bad_labels[0]]
            problems.append(
                f"dataset {spec.name!r}: the label ({spec.label_field!r}) must be an index 0..n-1 into the choices or "
                f"one of the choices, but records {listed(bad_labels)} are out of range "
                f"(e.g. label {first[spec.label_field]!r} with {len(first[spec.choices_field])} choices)."
            )
        if empty:
            problems.append(f"dataset {spec.name!r}: `normalize: {spec.normalize}` divides by the choice's length, "
                            f"but records {listed(empty)} have an empty choice.")
        return problems

    def __init__(self, spec, tokenizer, batch_size: int = 8, cache_dir: str | None = None,
                 records: list[dict[str, Any]] | None = None) -> None:
        super().__init__(spec, tokenizer, batch_size, cache_dir)
        require_chat_template(spec, tokenizer)
        records = self.checked_records(spec, records)
        self.normalize = spec.normalize or "none"
        self.pad_id = pad_id_of(tokenizer)
        # Per question: [(context ids, continuation ids)] per choice, the divisors, the gold index.
        self.items: list[tuple[list[tuple[list[int], list[int]]], list[float], int]] = []
        for record in records:
            choices = list(record[spec.choices_field])
            context = render_prompt(tokenizer, as_text(record[spec.prompt_field]), spec.chat)
            pairs = [encode_pair(tokenizer, context, spec.target_delimiter + c, spec.chat) for c in choices]
            if self.normalize == "length":
                divisors = [float(len(c)) for c in choices]
            elif self.normalize == "bytes":
                divisors = [float(len(c.encode("utf-8"))) for c in choices]
            else:
                divisors = [1.0] * len(choices)
            gold = label_index(record[spec.label_field], choices)
            assert gold is not None  # check_records refused out-of-range labels
            self.items.append((pairs, divisors, gold))
        self.batches = [list(range(s, min(s + batch_size, len(self.items))))
                        for s in range(0, len(self.items), batch_size)]

    def run_batch(self, model: torch.nn.Module, batch: list[int], device: torch.device, state: Any) -> BatchStats:
        rows = [pair for q in batch for pair in self.items[q][0]]
        sums, _, finite = score_continuations(model, rows, self.pad_id, device, logprobs=True)
        scores = []
        offset = 0
        for q in batch:
            pairs, divisors, gold = self.items[q]
            ranked = [s / d for s, d in zip(sums[offset:offset + len(pairs)], divisors)]
            offset += len(pairs)
            pred = max(range(len(ranked)), key=lambda i: (ranked[i], -i))  # first maximum, as numpy's argmax
            scores.append(float(pred == gold))
        tokens = sum(len(c) + len(t) - 1 for c, t in rows)
        return BatchStats(total=sum(scores), count=len(batch), extracted=len(batch), tokens=tokens, finite=finite,
                          item_scores=scores)
