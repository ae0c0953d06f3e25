"""``metric: generate``: batched greedy generation (KV cache), answer extraction, comparison.

Each question: the prompt (through the chat template with ``chat: true``), greedy decoding of at most
``max_new_tokens`` tokens that ends at EOS or a ``stop`` string (:mod:`evomerge_opt.fitness.generation`),
the answer extracted from the text (``extract``), and compared with the record's answer (``compare``:
``numeric`` by default for ``last_number``, else ``exact`` after ``normalize``, default ``strip``). A
question whose text yields no answer is wrong and not "extracted"; the extraction rate is reported per
dataset, and a rate of 0 is a warning (the prompt format or ``extract`` is likely wrong).
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.extract import answers_match, extractor_problem, make_extractor, to_number
from evomerge_opt.fitness.forward import encode, eos_ids, render_prompt
from evomerge_opt.fitness.generation import generate_batch
from evomerge_opt.fitness.metrics._base import METRICS, BatchStats, Metric
from evomerge_opt.fitness.metrics._records_common import (
    as_text,
    require_chat_template,
    text_field_problems,
    text_normalize_problems,
    text_normalize_steps,
)


@METRICS.register("generate")
class GenerateMetric(Metric):
    name = "generate"
    kind = "accuracy"
    direction = "maximize"
    extracts = True
    spec_keys = frozenset({"prompt_field", "answer_field", "normalize", "max_new_tokens", "stop", "extract",
                           "compare", "chat"})

    @classmethod
    def check_spec(cls, spec) -> list[str]:
        problems = text_normalize_problems(spec)
        if spec.max_new_tokens <= 0:
            problems.append(f"`max_new_tokens > 0` must hold for metric generate, but got {spec.max_new_tokens} "
                            f"(dataset {spec.name!r}).")
        problem = extractor_problem(spec.extract)
        if problem:
            problems.append(problem)
        if any(not s for s in spec.stop):
            problems.append(f"`stop` strings must not be empty, but got {spec.stop!r}.")
        return problems

    @classmethod
    def check_records(cls, spec, records: list[dict[str, Any]]) -> list[str]:
        problems = text_field_problems(spec, records, {"prompt_field": spec.prompt_field,
                                                       "answer_field": spec.answer_field})
        if not problems and spec.resolved_compare == "numeric":
            from evomerge_opt.fitness.records import listed

            bad = [i for i, r in enumerate(records) if to_number(as_text(r[spec.answer_field])) is None]
            if bad:
                problems.append(
                    f"dataset {spec.name!r}: `compare: numeric` needs numeric answers, but records {listed(bad)} hold "
                    f"e.g. {as_text(records[bad[0]][spec.answer_field])!r}; use `compare: exact`."
                )
        return problems

    def __init__(self, spec, tokenizer, batch_size: int = 8, cache_dir: str | None = None,
                 records: list[dict[str, Any]] | None = None) -> None:
        super().__init__(spec, tokenizer, batch_size, cache_dir)
        require_chat_template(spec, tokenizer)
        records = self.checked_records(spec, records)
        self.tokenizer = tokenizer
        self.extractor = make_extractor(spec.extract)
        self.compare = spec.resolved_compare
        steps = text_normalize_steps(spec)
        self.normalize = steps if spec.normalize is not None else ["strip"]
        self.prompts: list[list[int]] = []
        self.answers: list[str] = []
        for index, record in enumerate(records):
            ids = encode(tokenizer, render_prompt(tokenizer, as_text(record[spec.prompt_field]), spec.chat), spec.chat)
            if not ids:
                raise ConfigError(f"Dataset {spec.name!r}, record {index}: the prompt has no tokens.")
            self.prompts.append(ids)
            self.answers.append(as_text(record[spec.answer_field]))
        self.last_texts: dict[int, str] = {}  # question -> generated text of the latest evaluation (debugging)
        self.batches = [list(range(s, min(s + batch_size, len(self.prompts))))
                        for s in range(0, len(self.prompts), batch_size)]

    def begin(self, model: torch.nn.Module, device: torch.device) -> Any:
        self.last_texts = {}
        return eos_ids(model, self.tokenizer)

    def run_batch(self, model: torch.nn.Module, batch: list[int], device: torch.device, state: Any) -> BatchStats:
        out = generate_batch(model, self.tokenizer, [self.prompts[q] for q in batch], self.spec.max_new_tokens,
                             self.spec.stop, eos_token_ids=state, device=device)
        extracted = 0
        scores = []
        for q, text in zip(batch, out.texts):
            self.last_texts[q] = text
            answer = self.extractor(text)
            if answer is not None:
                extracted += 1
            scores.append(float(answers_match(answer, self.answers[q], self.compare, self.normalize)))
        # Tokens processed: each prompt once, each generated token once (the cache holds the rest).
        return BatchStats(total=sum(scores), count=len(batch), extracted=extracted,
                          tokens=out.prompt_tokens + out.new_tokens, finite=out.finite, item_scores=scores)
