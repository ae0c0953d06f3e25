"""Helpers shared by the search tests: a tiny evaluation set and search spaces over the tiny families."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "what is two plus three? the answer is five.",
    "the lazy dog sleeps while the quick fox runs",
    "what is one plus one? the answer is two.",
]


def write_data(path: Path, rows: int = 16) -> Path:
    """A small jsonl with a ``text`` field (rows of different lengths, so batches are ragged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"text": LINES[i % len(LINES)] + " again" * (i % 3)}) + "\n")
    return path


def tiny_space(family: dict[str, Path], data: Path | list[Path], kind: str = "ps", **overrides: Any) -> dict[str, Any]:
    """A search space over ``family`` (base, ft0, ft1) scored on ``data`` (one path or several)."""
    paths = data if isinstance(data, list) else [data]
    space: dict[str, Any] = {
        "kind": kind,
        "pool": {"models": {"_pretrained_": str(family["base"]), "a": str(family["ft0"]), "b": str(family["ft1"])},
                 "model_kwargs": {"dtype": "float32"}},
        "fitness": {"datasets": [{"name": f"d{i}", "path": str(p), "seq_len": 16} for i, p in enumerate(paths)],
                    "batch_size": 8},
        "sampler": {"name": "random", "seed": 0, "popsize": 3},
        "pruner": {"name": "none"},
        "budget": {"trials": 4},
        "baselines": False,
    }
    if kind in ("ps", "ps+dfs"):
        space["ps"] = {"methods": ["ties", "task_arithmetic"], "weight": {"low": 0.2, "high": 1.2},
                       "density": {"low": 0.3, "high": 1.0}, "lambda": {"low": 0.5, "high": 1.5}}
    if kind in ("dfs", "ps+dfs"):
        sources = ["ps", "a", "b"] if kind == "ps+dfs" else ["a", "b"]
        space["dfs"] = {"num_r": 2, "sources": sources, "scaling": {"low": 0.5, "high": 1.5}}
        if kind == "dfs":
            del space["pool"]["models"]["_pretrained_"]
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(space.get(key), dict):
            space[key] = {**space[key], **value}
        else:
            space[key] = value
    return space
