"""Loads this folder's JSONL files for the test tasks (lm-eval's `custom_dataset`), whatever the CWD."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _records(name: str) -> list[dict]:
    text = (HERE / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_tiny_choice(**kwargs):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_records("tiny_choice.jsonl"))})
