"""lm-evaluation-harness tasks as fitness datasets, scored on the candidate IN MEMORY (optional extra).

``pip install 'evomerge-opt[lmeval]'``. A task is loaded once per worker through lm-eval's public API
(``TaskManager(include_path=...)``, its own tasks included); each evaluation wraps the candidate in
``HFLM(pretrained=model, tokenizer=tok, backend="causal")`` — nothing is written to disk — and runs
``simple_evaluate`` on the task object.

Batches: for a metric lm-eval aggregates by ``mean`` (acc, acc_norm, exact_match, ...) the task's first
``limit`` documents are scored ``batch_size`` documents at a time (``simple_evaluate(samples={task:
[doc ids]})``) and the value is the mean of the per-document values lm-eval logs, i.e. the number
``lm_eval --model hf --model_args pretrained=DIR --tasks TASK --limit N`` prints for the applied
directory; a running value is reported after every batch, so pruning works on lm-eval tasks too. Other
aggregations (corpus BLEU, F1, perplexity) are scored in one batch and take lm-eval's aggregate.

Kept as lm-eval does: its seeds for every call (``random`` 0, numpy/torch 1234, few-shot 1234); the
global random states of the caller are restored afterwards. Different: the candidate's weights are never
re-tied (``HFLM`` calls ``model.tie_weights()``, which on a DFS candidate built by reference would
write the input model's embeddings into the output model's head).

Extraction rate: for ``generate_until`` tasks, the share of documents whose filtered response is not
empty or ``[invalid]`` (lm-eval's regex filters' fallback); for log-likelihood tasks 1.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.metrics._base import BatchStats, Metric
from evomerge_opt.fitness.spec import LMEVAL_INSTALL, LMEvalTaskSpec

logger = logging.getLogger(__name__)

_INVALID = ("", "[invalid]")


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(
            f"lm-evaluation-harness is not installed, but the fitness names lm-eval tasks; install it with `{LMEVAL_INSTALL}`."
        ) from None
    return lm_eval


def metric_kind(metric: str) -> str:
    """``accuracy`` (higher is better), ``perplexity`` (a lower-is-better perplexity) or ``lower``."""
    higher = None
    with contextlib.suppress(ImportError):
        from lm_eval.api.registry import is_higher_better

        with _quiet():
            higher = is_higher_better(metric)
    if higher is None or higher:
        return "accuracy"
    return "perplexity" if "perplexity" in metric else "lower"


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING):
    """lm-eval logs every request at INFO and warns about every in-memory model; keep errors only."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "lm_eval.api.registry")]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, previous):
            lg.setLevel(lvl)


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None, include_defaults: bool = True) -> Any:
    """lm-eval's ``TaskManager`` (indexing lm-eval's own ~15k task configs takes seconds: cached)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _resolve_include(spec: LMEvalTaskSpec) -> str | None:
    if spec.include_path is None:
        return None
    return str(Path(spec.include_path).expanduser().resolve())


def _find_task(spec: LMEvalTaskSpec) -> tuple[Any, Any]:
    """(task manager, index entry) of ``spec.task``; unknown -> ConfigError with close names."""
    include = _resolve_include(spec)
    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"`include_path` {spec.include_path!r} of lm-eval task {spec.task!r} is not a directory.")
    if include is not None:  # the task usually lives in the include path: index just that first (fast)
        manager = task_manager(include, include_defaults=False)
        entry = manager.task_index.get(spec.task)
        if entry is not None:
            return manager, entry
    manager = task_manager(include, include_defaults=True)  # lm-eval's own ~15k configs: seconds
    entry = manager.task_index.get(spec.task)
    if entry is not None:
        return manager, entry
    names = manager.all_tasks
    close = difflib.get_close_matches(spec.task, names, n=5)
    hint = f" Close names: {', '.join(close)}." if close else ""
    where = f" or in {spec.include_path!r}" if spec.include_path else "; tasks of your own need `include_path`"
    raise ConfigError(f"Unknown lm-eval task {spec.task!r}: not among lm-eval's {len(names)} tasks{where}.{hint}")


def _declared_metrics(entry: Any) -> list[str] | None:
    """Metric names a task's YAML declares (lm-eval's defaults for its output type), None if unknown."""
    if getattr(entry, "yaml_path", None) is None:
        return None
    try:
        from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY
        from lm_eval.tasks._yaml_loader import (
            load_yaml as lm_eval_load_yaml,  # lm-eval's own loader (!function)
        )

        cfg = lm_eval_load_yaml(entry.yaml_path, resolve_func=False)
    except (ImportError, AttributeError, OSError, TypeError, ValueError, yaml.YAMLError):
        # a private helper of lm-eval: if it moved or fails, the full task load checks the metric
        return None
    if cfg.get("metric_list"):
        return [m.get("metric") for m in cfg["metric_list"] if isinstance(m, dict) and isinstance(m.get("metric"), str)]
    output_type = cfg.get("output_type")
    return list(DEFAULT_METRIC_REGISTRY.get(output_type, [])) or None


def task_problems(spec: LMEvalTaskSpec) -> list[str]:
    """Problems found without loading the task's data: include path, task name, kind, metric."""
    try:
        _, entry = _find_task(spec)
    except ConfigError as exc:
        return exc.problems
    from lm_eval.tasks._index import Kind

    if entry.kind not in (Kind.TASK, Kind.PY_TASK):
        return [f"lm-eval name {spec.task!r} is a {entry.kind.name.lower()}, not a task; name its tasks one by one."]
    declared = _declared_metrics(entry)
    if declared is not None and spec.metric_name not in declared:
        return [f"lm-eval task {spec.task!r} has no metric {spec.metric_name!r}; its metrics are: {', '.join(declared)}."]
    return []


def _quiet_hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM without per-request progress bars (a search runs thousands of small evaluations)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def wrap_model(model: torch.nn.Module, tokenizer: Any, batch_size: int) -> Any:
    """``HFLM(pretrained=model, tokenizer=tokenizer)`` around the in-memory model, weights untouched."""
    require_lm_eval()
    cls = _quiet_hflm_class()
    # HFLM re-ties the weights of the model it is given; a candidate is scored as built.
    model.__dict__["tie_weights"] = lambda *args, **kwargs: None
    try:
        with _quiet():
            return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    finally:
        model.__dict__.pop("tie_weights", None)


@contextlib.contextmanager
def _kept_random_state():
    """lm-eval seeds ``random``, numpy and torch on every call; give the caller its own states back."""
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class LMEvalTask(Metric):
    """One lm-eval task as a fitness dataset (same contract as the metrics in ``fitness/metrics``)."""

    name = "lm_eval"
    spec_keys = frozenset()

    def __init__(self, spec: LMEvalTaskSpec, tokenizer: Any, batch_size: int = 8, cache_dir: str | None = None) -> None:
        require_lm_eval()
        self.spec = spec  # type: ignore[assignment]
        self.dataset_name = spec.name or spec.task
        self.weight = float(spec.weight)
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.manager, _ = _find_task(spec)
        problems = task_problems(spec)
        if problems:
            raise ConfigError(f"lm-eval task {spec.task!r} cannot be used:", problems)
        with _quiet():
            loaded = self.manager.load([spec.task])
        tasks = loaded["tasks"]
        if len(tasks) != 1:
            raise ConfigError(f"lm-eval name {spec.task!r} loads {len(tasks)} tasks ({sorted(tasks)}); name one task.")
        self.task_name, self.task = next(iter(tasks.items()))
        if spec.num_fewshot is not None:
            self.task.set_config(key="num_fewshot", value=spec.num_fewshot)
        metrics = self.task.aggregation()
        if spec.metric_name not in metrics:
            raise ConfigError(f"lm-eval task {spec.task!r} has no metric {spec.metric_name!r}; its metrics are: "
                              f"{', '.join(metrics)}.")
        filters = [f.name for f in getattr(self.task, "_filters", [])] or ["none"]
        if spec.filter_name is not None and spec.filter_name not in filters:
            raise ConfigError(f"lm-eval task {spec.task!r} has no filter {spec.filter_name!r}; its filters are: "
                              f"{', '.join(filters)} (write `metric: {spec.metric_name},{filters[0]}`).")
        self.filter = spec.filter_name or filters[0]
        higher = self.task.higher_is_better().get(spec.metric_name, True)
        self.kind = "accuracy" if higher else ("perplexity" if "perplexity" in spec.metric_name else "lower")
        self.direction = "maximize" if higher else "minimize"
        self.extracts = self.task.OUTPUT_TYPE == "generate_until"
        from lm_eval.api.metrics import mean

        self.by_mean = metrics[spec.metric_name] is mean
        total = len(self.task.eval_docs)
        count = min(total, spec.limit) if spec.limit is not None else total
        if count == 0:
            raise ConfigError(f"lm-eval task {spec.task!r} has no documents to score.")
        docs = list(range(count))
        step = batch_size if self.by_mean else count
        self.batches = [docs[s:s + step] for s in range(0, count, step)]

    @property
    def metric_label(self) -> str:
        return f"lm_eval:{self.spec.metric}"

    @property
    def result_key(self) -> str:
        return f"{self.spec.metric_name},{self.filter}"

    def begin(self, model: torch.nn.Module, device: torch.device) -> Any:
        return wrap_model(model, self.tokenizer, self.batch_size)

    def run_batch(self, model: torch.nn.Module, batch: list[int], device: torch.device, state: Any) -> BatchStats:
        from lm_eval import simple_evaluate

        with _kept_random_state(), _quiet():
            out = simple_evaluate(model=state, tasks=[self.task], samples={self.task_name: list(batch)},
                                  bootstrap_iters=0, log_samples=True, task_manager=self.manager)
        samples = [s for s in out["samples"][self.task_name] if s.get("filter") == self.filter]
        if len(samples) != len(batch):
            raise RuntimeError(f"lm-eval returned {len(samples)} samples for {len(batch)} documents of {self.task_name!r}")
        metric = self.spec.metric_name
        samples.sort(key=lambda s: s["doc_id"])
        scores = [float(s[metric]) for s in samples] if self.by_mean else None
        if scores is not None:
            total = float(sum(scores))
        else:  # one batch with every document: lm-eval's own aggregate
            total = float(out["results"][self.task_name][self.result_key]) * len(batch)
        extracted = len(batch)
        if self.extracts:
            extracted = sum(1 for s in samples if not _is_invalid(s.get("filtered_resps")))
        tokens = sum(_sample_tokens(self.tokenizer, s) for s in samples)
        return BatchStats(total=total, count=len(batch), extracted=extracted, tokens=tokens,
                          finite=math.isfinite(total), item_scores=scores)

    def value(self, total: float, count: int) -> float:
        return total / count if count else math.nan

    def cost(self, total: float, count: int) -> float:
        value = self.value(total, count)
        if self.kind == "accuracy":
            return 1.0 - value
        if self.kind == "perplexity":
            return math.log(value) if value > 0 else math.nan
        return value


def _is_invalid(resp: Any) -> bool:
    while isinstance(resp, (list, tuple)) and resp:
        resp = resp[0]
    return not isinstance(resp, str) or resp.strip() in _INVALID


def _sample_tokens(tokenizer: Any, sample: dict[str, Any]) -> int:
    """Tokens of a document's requests (contexts + continuations): the evaluation's cost measure."""
    total = 0
    for args in sample.get("arguments") or []:
        for part in args if isinstance(args, (list, tuple)) else [args]:
            if isinstance(part, str):
                total += len(tokenizer(part, add_special_tokens=False)["input_ids"])
    return total
