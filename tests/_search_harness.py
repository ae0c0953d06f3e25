"""Helpers shared by the subprocess tests of `evo-merge search` / `worker` (resume, PostgreSQL workers)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from evomerge_opt.search.storage import make_storage

DATA_LINES = 1500  # ~40k evaluation tokens: ~1-2 s per trial on the 2-layer tiny Llama with one thread
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "what",
    "is",
    "two",
    "plus",
    "three",
    "answer",
    "five",
]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def write_space(
    folder: Path,
    family: dict[str, Path],
    study: str,
    trials: int,
    lines: int = DATA_LINES,
    baselines: bool = True,
) -> Path:
    """A tiny PS search space over the tiny Llama family, with a fitness file of ``lines`` lines."""
    rng = random.Random(0)
    data = folder / "fitness.jsonl"
    with data.open("w") as handle:
        for _ in range(lines):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(24))}) + "\n")
    space = {
        "study": study,
        "kind": "ps",
        "pool": {
            "models": {
                "_pretrained_": str(family["base"]),
                "ft0": str(family["ft0"]),
                "ft1": str(family["ft1"]),
            },
            "model_kwargs": {"dtype": "float32"},
        },
        "ps": {
            "methods": ["ties"],
            "granularity": "global",
            "weight": {"low": 0.1, "high": 1.0},
            "density": {"low": 0.2, "high": 1.0},
            "dtype": "float32",
        },
        "fitness": {"datasets": [{"name": "text", "path": str(data), "seq_len": 32}], "batch_size": 32},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"trials": trials},
        "baselines": baselines,
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return env


def evo_merge(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge_opt.cli.main", *args]


def read_trials(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read by a storage with no heartbeat of its own ([] while the study is absent)."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return []  # not created yet: leave the creation of the schema to the search itself
    storage = make_storage(url, heartbeat_interval=None)
    try:
        if study not in {s.study_name for s in storage.get_all_studies()}:
            return []
        return optuna.load_study(study_name=study, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` with stdout+stderr going to ``log`` (a pipe nobody reads could fill and block it)."""
    handle = log.open("w")
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
    finally:
        handle.close()  # the child keeps its own descriptor


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> list:
    """Poll ``predicate`` every 0.1 s until it returns something truthy; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{tail(log)}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{tail(log)}")
