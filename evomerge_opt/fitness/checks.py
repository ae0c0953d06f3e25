"""Every rule of a ``fitness:`` section, checked before any model loads (the top of ``fitness/``).

:mod:`evomerge_opt.fitness.spec` holds the schemas; the metrics (:mod:`evomerge_opt.fitness.metrics`)
declare which keys they read and their own rules; this module applies both, so ``evo-merge validate``,
the search space and ``evo-merge eval`` reject the same bad input:

* :func:`parse_fitness_dataset` -- a checked :class:`~evomerge_opt.fitness.spec.FitnessDatasetSpec`;
* :func:`fitness_problems` -- every problem of the ``datasets`` and ``lm_eval`` lists (``check_data=True``
  also reads each data file to check fields, labels and numeric answers; no model, no tokenizer);
* :func:`fitness_objectives` -- the objective names and directions (the rule is in
  :mod:`evomerge_opt.fitness.combine`);
* :func:`check_dataset` -- load and check one accuracy dataset's records.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

from evomerge_opt.data.spec import DataSpec
from evomerge_opt.errors import ConfigError, ModelSourceError
from evomerge_opt.fitness import lmeval
from evomerge_opt.fitness.combine import objective_for
from evomerge_opt.fitness.metrics import METRICS
from evomerge_opt.fitness.spec import (
    LMEVAL_INSTALL,
    METRIC_KEYS,
    WINDOW_KEYS,
    Direction,
    FitnessDatasetSpec,
    LMEvalTaskSpec,
    parse_lm_eval_task,
)


def metric_problems(spec: FitnessDatasetSpec) -> list[str]:
    """Problems of a dataset entry's metric keys: the metric exists, reads the keys given, and its own
    schema rules (``Metric.check_spec``) hold. Nothing is read from disk."""
    if spec.metric not in METRICS:
        valid = ", ".join(METRICS.names())
        return [f"unknown metric {spec.metric!r} (dataset {spec.name!r}); valid metrics are: {valid}."]
    metric = METRICS.get(spec.metric)
    problems = []
    foreign = sorted((spec.model_fields_set & (WINDOW_KEYS | METRIC_KEYS)) - metric.spec_keys)
    if foreign:
        problems.append(
            f"key(s) {foreign} do not apply to metric {spec.metric!r} (dataset {spec.name!r}); it reads "
            f"{sorted(metric.spec_keys) or 'none of the metric keys'}. Remove them or change `metric`."
        )
    problems.extend(metric.check_spec(spec))
    return problems


def parse_fitness_dataset(value: FitnessDatasetSpec | DataSpec | dict[str, Any] | str | os.PathLike[str],
                          **defaults: Any) -> FitnessDatasetSpec:
    """A :class:`FitnessDatasetSpec` from a spec, a mapping or a bare path (``defaults`` fill keys not given).

    Defaults that do not apply to the entry's metric (e.g. a CLI's ``seq_len`` on an exact-match set)
    are dropped, so one set of CLI defaults serves every metric.
    """
    if isinstance(value, DataSpec) and not isinstance(value, FitnessDatasetSpec):
        value = value.model_dump(exclude_unset=True)
    if isinstance(value, FitnessDatasetSpec):
        if not defaults:
            return value
        value = value.model_dump(exclude_unset=True)
    if isinstance(value, dict) and defaults:
        name = value.get("metric", "perplexity")
        if name in METRICS:
            keys = METRICS.get(name).spec_keys
            defaults = {k: v for k, v in defaults.items() if k not in (WINDOW_KEYS | METRIC_KEYS) or k in keys}
    spec = FitnessDatasetSpec.parse(value, **defaults)
    problems = metric_problems(spec)
    if problems:
        raise ConfigError(f"invalid dataset spec {value!r}", problems)
    return spec


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_problems(spec: LMEvalTaskSpec, where: str = "lm_eval") -> list[str]:
    """Problems of one lm-eval entry that can be found without loading the task's data or any model:
    lm-eval installed, ``include_path`` a directory, the task known, the metric one the task's YAML lists."""
    if not lm_eval_available():
        return [f"{where}: lm-evaluation-harness is not installed; install it with `{LMEVAL_INSTALL}`."]
    return [f"{where}: {p}" for p in lmeval.task_problems(spec)]


def _entry_problems(index: int, entry: Any, check_data: bool) -> tuple[str | None, list[str]]:
    where = f"fitness.datasets[{index}]"
    try:
        spec = parse_fitness_dataset(entry)
    except ConfigError as exc:
        return None, [f"{where}: {p}" for p in exc.problems]
    if not check_data:
        return spec.name, []
    try:
        check_dataset(spec)
    except (ConfigError, ModelSourceError) as exc:
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        return spec.name, [f"{where}: {p}" for p in problems]
    return spec.name, []


def fitness_problems(datasets: Sequence[Any], lm_eval: Sequence[Any] = (), multi_objective: bool = False,
                     check_data: bool = False) -> list[str]:
    """Every problem of a ``fitness:`` section's ``datasets`` and ``lm_eval`` lists (messages start with
    their location, e.g. ``fitness.datasets[1]: ...``). Nothing is loaded; ``check_data=True`` also reads
    each local data file to check the named fields, labels and numeric answers (cheap: no model, no
    tokenizer), which is what the search space's ``check_sources`` should do."""
    out: list[str] = []
    if not datasets and not lm_eval:
        out.append("fitness.datasets: at least one dataset (or a fitness.lm_eval task) is required.")
    names: list[str] = []
    for i, entry in enumerate(datasets):
        name, problems = _entry_problems(i, entry, check_data)
        out.extend(problems)
        if name is not None:
            names.append(name)
    for j, entry in enumerate(lm_eval):
        where = f"fitness.lm_eval[{j}]"
        try:
            spec = parse_lm_eval_task(entry)
        except ConfigError as exc:
            out.extend(f"{where}: {p}" for p in exc.problems)
            continue
        names.append(spec.name or spec.task)
        out.extend(lm_eval_problems(spec, where))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        out.append(f"fitness: dataset and lm-eval task names must be unique, but {duplicates} repeat; set `name:`.")
    return out


def fitness_objectives(datasets: Sequence[Any], lm_eval: Sequence[Any] = (),
                       multi_objective: bool = False) -> tuple[list[str], list[Direction]]:
    """``(objective names, directions)`` of a valid fitness section, without loading anything.

    Single objective: ``["perplexity"]`` (minimise) when every entry is perplexity, ``["accuracy"]``
    (maximise) when every entry is an accuracy, else ``["cost"]`` (minimise); multi-objective: one per
    entry, named like the entry, each with its metric's direction. The rule is in
    :mod:`evomerge_opt.fitness.combine`.
    """
    kinds, directions, names = [], [], []
    for entry in datasets:
        spec = parse_fitness_dataset(entry)
        metric = METRICS.get(spec.metric)
        kinds.append(metric.kind)
        directions.append(metric.direction)
        names.append(spec.name or "")
    for entry in lm_eval:
        spec = parse_lm_eval_task(entry)
        kind = lmeval.metric_kind(spec.metric_name)
        kinds.append(kind)
        directions.append("maximize" if kind == "accuracy" else "minimize")
        names.append(spec.name or spec.task)
    if multi_objective:
        return names, directions
    name, direction = objective_for(kinds)
    return [name], [direction]


def check_dataset(spec: FitnessDatasetSpec, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Load (unless given) and check the records of an accuracy dataset; returns them.

    Perplexity datasets are checked by loading their text as the windows loader does (a missing text
    field is a :class:`~evomerge_opt.errors.ModelSourceError` there); here they only need to exist.
    """
    metric = METRICS.get(spec.metric)
    if not metric.uses_records:
        if spec.path is not None:
            from evomerge_opt.data.records import resolve_path

            resolve_path(spec)  # exists (zoo: refs resolved)
        return []
    return metric.checked_records(spec, records)
