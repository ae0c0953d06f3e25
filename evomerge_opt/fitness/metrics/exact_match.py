"""``metric: exact_match``: is the answer what greedy decoding writes after the prompt? One forward pass.

Greedy decoding writes the answer tokens ``a_1..a_k`` after the prompt exactly when every ``a_j`` is
the arg-max of the model's prediction given the prompt and ``a_1..a_{j-1}`` (induction over j: each
step of greedy decoding conditions on what it wrote, which is then ``a_1..a_{j-1}``). So the check runs
teacher-forced: ``prompt + answer`` through the model once, the arg-max compared at the k answer
positions. The answer's tokens are ``enc(prompt + target_delimiter + answer + answer_suffix)`` after the
prompt's own tokens (what generation starts from).

Normalisation under teacher forcing: the check compares TOKEN SEQUENCES, so it cannot normalise what
the model writes, only choose which sequences count. ``strip`` strips the reference answer (data like
``"42\\n"`` still asks for ``" 42"``); ``casefold`` accepts the answer as given, lower-cased,
upper-cased or capitalised — each variant is one more row of the same forward pass, and the question
is right when greedy decoding writes any of them. Anything broader (free text, a different spacing or
tokenisation of the same string) needs ``metric: generate`` with ``compare: exact``, which normalises the
generated text itself. Every question is "extracted" (there is nothing to extract).
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.forward import (
    continuation_tokens,
    encode,
    pad_id_of,
    render_prompt,
    score_continuations,
)
from evomerge_opt.fitness.metrics._base import METRICS, BatchStats, Metric
from evomerge_opt.fitness.metrics._records_common import (
    as_text,
    require_chat_template,
    text_field_problems,
    text_normalize_problems,
    text_normalize_steps,
)


def answer_variants(answer: str, steps: list[str]) -> list[str]:
    """The reference texts a normalisation accepts (see the module docstring), deduplicated in order."""
    if "strip" in steps:
        answer = answer.strip()
    variants = [answer]
    if "casefold" in steps:
        variants += [answer.lower(), answer.upper(), answer.capitalize()]
    return list(dict.fromkeys(variants))


@METRICS.register("exact_match")
class ExactMatchMetric(Metric):
    name = "exact_match"
    kind = "accuracy"
    direction = "maximize"
    spec_keys = frozenset({"prompt_field", "answer_field", "target_delimiter", "answer_suffix", "normalize", "chat"})

    @classmethod
    def check_spec(cls, spec) -> list[str]:
        return text_normalize_problems(spec)

    @classmethod
    def check_records(cls, spec, records: list[dict[str, Any]]) -> list[str]:
        problems = text_field_problems(spec, records, {"prompt_field": spec.prompt_field,
                                                       "answer_field": spec.answer_field})
        if problems:
            return problems
        steps = text_normalize_steps(spec)
        empty = [i for i, r in enumerate(records)
                 if not (answer_variants(as_text(r[spec.answer_field]), steps)[0] + spec.answer_suffix)]
        if empty:
            from evomerge_opt.fitness.records import listed

            problems.append(f"dataset {spec.name!r}: records {listed(empty)} have an empty answer (and no "
                            "`answer_suffix`); there is nothing for greedy decoding to write.")
        return problems

    def __init__(self, spec, tokenizer, batch_size: int = 8, cache_dir: str | None = None,
                 records: list[dict[str, Any]] | None = None) -> None:
        super().__init__(spec, tokenizer, batch_size, cache_dir)
        require_chat_template(spec, tokenizer)
        records = self.checked_records(spec, records)
        steps = text_normalize_steps(spec)
        self.pad_id = pad_id_of(tokenizer)
        # Per question: the prompt's tokens and the token sequences that count as right.
        self.items: list[tuple[list[int], list[list[int]]]] = []
        for index, record in enumerate(records):
            text = render_prompt(tokenizer, as_text(record[spec.prompt_field]), spec.chat)
            prompt_ids = encode(tokenizer, text, spec.chat)
            targets = []
            for variant in answer_variants(as_text(record[spec.answer_field]), steps):
                ids = continuation_tokens(tokenizer, prompt_ids, text, spec.target_delimiter + variant + spec.answer_suffix,
                                          spec.chat)
                if ids and ids not in targets:
                    targets.append(ids)
            if not prompt_ids or not targets:
                raise ConfigError(f"Dataset {spec.name!r}, record {index}: the prompt or the answer has no tokens.")
            self.items.append((prompt_ids, targets))
        self.batches = [list(range(s, min(s + batch_size, len(self.items))))
                        for s in range(0, len(self.items), batch_size)]

    def run_batch(self, model: torch.nn.Module, batch: list[int], device: torch.device, state: Any) -> BatchStats:
        rows, owner = [], []
        for q in batch:
            prompt_ids, targets = self.items[q]
            for target in targets:
                rows.append((prompt_ids, target))
                owner.append(q)
        _, greedy, finite = score_continuations(model, rows, self.pad_id, device, logprobs=False)
        right = {q for q, g in zip(owner, greedy) if g}
        tokens = sum(len(p) + len(t) - 1 for p, t in rows)
        return BatchStats(total=float(len(right)), count=len(batch), extracted=len(batch), tokens=tokens,
                          finite=finite, item_scores=[float(q in right) for q in batch])
