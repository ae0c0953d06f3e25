"""Scores on the zoo's held-out sets: perplexity (the fitness evaluator) and answer accuracy.

Perplexity uses :class:`evomerge_opt.fitness.perplexity.PerplexityEvaluator` on one row per record
(``seq_len`` tokens at most), exactly what a search's fitness computes. Answer accuracy is exact match
of greedy decoding, computed teacher-forced in one forward pass: a question counts as answered when
the arg-max prediction at every position of `` <answer>.`` (the answer digits and the closing period)
is the true token, which is what greedy generation after the prompt would write.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from evomerge_opt.zoo.tasks import TASKS

logger = logging.getLogger(__name__)

SEQ_LEN = 64


def read_records(path: str | Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def answer_accuracy(model, tokenizer, records: list[dict[str, str]], batch_size: int = 32) -> float:
    """Fraction of ``records`` (with ``prompt``/``answer``/``text``) whose answer greedy decoding gets right."""
    if not records:
        raise ValueError("no question-answer records to score")
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        rows = [tokenizer(r["text"])["input_ids"] for r in chunk]
        prompt_lens = [len(tokenizer(r["prompt"])["input_ids"]) for r in chunk]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        answer = torch.zeros((len(rows), width), dtype=torch.bool)  # positions of the answer tokens
        for i, (row, n) in enumerate(zip(rows, prompt_lens, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            answer[i, n : len(row)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]  # [b, L-1, V]
        hit = logits.argmax(-1).cpu() == ids[:, 1:]
        correct += int((hit | ~answer[:, 1:]).all(dim=1).sum())
    return correct / len(records)


def score_model(model, tokenizer, root: str | Path, split: str = "test", tasks=TASKS, batch_size: int = 32,
                cache_dir=None) -> dict[str, float]:
    """``{task: perplexity}`` plus ``{task + "_acc": accuracy}`` for the question-answer tasks."""
    from evomerge_opt.data.spec import DataSpec
    from evomerge_opt.data.windows import load_windows
    from evomerge_opt.fitness.perplexity import PerplexityEvaluator

    root = Path(root)
    datasets = []
    for task in tasks:
        spec = DataSpec(name=task, path=str(root / "data" / task / f"{split}.jsonl"), text_field="text",
                        seq_len=SEQ_LEN)
        datasets.append((task, load_windows(spec, tokenizer, cache_dir=cache_dir), 1.0))
    model.eval()
    result = PerplexityEvaluator(datasets, batch_size=batch_size).evaluate(model)
    scores: dict[str, float] = {task: result.per_dataset[task].perplexity for task in tasks}
    for task in tasks:
        if task.startswith("math"):
            records = read_records(root / "data" / task / f"{split}.jsonl")
            scores[f"{task}_acc"] = answer_accuracy(model, tokenizer, records, batch_size)
    return scores
