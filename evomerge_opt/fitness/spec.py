"""The schema of a search's ``fitness:`` section: datasets scored by a metric, and lm-eval tasks.

One place holds every rule of a fitness entry, so ``evo-merge validate``, the search space and
``evo-merge eval`` all reject the same bad input, before any model loads::

    fitness:
      datasets:
        - {path: zoo:data/english/dev.jsonl, seq_len: 64}                  # metric: perplexity (default)
        - {name: target, path: zoo:data/math_lang/dev.jsonl, metric: exact_match,
           answer_suffix: ".", weight: 2.0}                                 # greedy writes " <answer>."
        - {path: qa.jsonl, metric: generate, max_new_tokens: 24, stop: ["\\n"],
           extract: last_number, compare: numeric, chat: true}
        - {path: mc.jsonl, metric: choice, choices_field: choices, label_field: label, normalize: length}
      lm_eval:                                                              # pip install evomerge-opt[lmeval]
        - {task: arc_easy, limit: 200, metric: acc_norm, weight: 1.0}
        - {task: my_task, include_path: tasks/, metric: acc}
      batch_size: 16
      multi_objective: false

* :class:`FitnessDatasetSpec` extends :class:`~evomerge_opt.fitness.data.DataSpec` (path/hub, name,
  weight, ``num_samples``, ``shuffle``/``seed``) with ``metric`` and the metric's own keys. The keys of
  windowed perplexity data (``seq_len``, ``packing``, ``text_field``, ...) belong to ``perplexity`` only;
  an accuracy metric's keys (``prompt_field``, ``extract``, ...) to that metric only. Setting a key the
  metric does not read is an error, never silently ignored.
* :class:`LMEvalTaskSpec`: an lm-evaluation-harness task.
* :func:`fitness_problems` (every problem, nothing loaded; ``check_data=True`` also reads each data file
  to check the named fields and labels), :func:`fitness_objectives` (objective names and directions),
  :func:`parse_fitness_dataset`, :func:`parse_lm_eval_task`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge_opt.errors import ConfigError, validation_problems
from evomerge_opt.fitness.data import DataSpec

Direction = Literal["minimize", "maximize"]

# DataSpec keys that shape token windows: only perplexity reads them.
WINDOW_KEYS = frozenset({"text_field", "seq_len", "max_tokens", "packing", "add_eos", "text_split"})
# Keys this module adds; each metric says which of them it reads (`Metric.spec_keys`).
METRIC_KEYS = frozenset({
    "prompt_field", "answer_field", "choices_field", "label_field", "target_delimiter", "answer_suffix",
    "normalize", "max_new_tokens", "stop", "extract", "compare", "chat",
})
LMEVAL_INSTALL = "pip install 'evomerge-opt[lmeval]'"


class FitnessDatasetSpec(DataSpec):
    """One fitness dataset: a :class:`DataSpec` plus the metric that scores it (see the module docstring).

    Metric keys (defaults in brackets; which metric reads which is in docs/ARCHITECTURE.md, "Task fitness"):
    ``prompt_field`` [prompt], ``answer_field`` [answer], ``choices_field`` [choices], ``label_field``
    [label], ``target_delimiter`` [" "] (between the prompt and the answer / each choice, lm-eval's),
    ``answer_suffix`` [""] (exact_match: text greedy decoding must also write after the answer, e.g. "."),
    ``normalize`` (exact_match/generate: ``strip`` and/or ``casefold``; choice: ``none|length|bytes``),
    ``max_new_tokens`` [32], ``stop`` [[]] (strings that end a generation), ``extract`` [last_number]
    (``last_number | first_line | regex:<pattern with one group>``), ``compare`` (``exact | numeric``;
    default numeric for last_number, else exact), ``chat`` [false] (render the prompt with the tokenizer's
    chat template as one user turn, with the generation prompt).
    """

    metric: str = "perplexity"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    choices_field: str = "choices"
    label_field: str = "label"
    target_delimiter: str = " "
    answer_suffix: str = ""
    normalize: str | list[str] | None = None
    max_new_tokens: int = 32
    stop: list[str] = Field(default_factory=list)
    extract: str = "last_number"
    compare: Literal["exact", "numeric"] | None = None
    chat: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_metric(self) -> FitnessDatasetSpec:
        from evomerge_opt.fitness.metrics import METRICS

        if self.metric not in METRICS:
            raise ValueError(
                f"unknown metric {self.metric!r} (dataset {self.name!r}); valid metrics are: {', '.join(METRICS.names())}."
            )
        metric = METRICS.get(self.metric)
        given = self.model_fields_set
        problems = []
        foreign = sorted((given & (WINDOW_KEYS | METRIC_KEYS)) - metric.spec_keys)
        if foreign:
            problems.append(
                f"key(s) {foreign} do not apply to metric {self.metric!r} (dataset {self.name!r}); it reads "
                f"{sorted(metric.spec_keys) or 'none of the metric keys'}. Remove them or change `metric`."
            )
        problems.extend(metric.check_spec(self))
        if problems:
            raise ValueError(" ".join(problems))
        return self

    @classmethod
    def parse(cls, value: Any, **overrides: Any) -> FitnessDatasetSpec:  # type: ignore[override]
        try:
            return super().parse(value, **overrides)  # type: ignore[return-value]
        except ConfigError as exc:  # pydantic prefixes a validator's message with "Value error, "
            problems = [p.replace("Value error, ", "", 1) for p in exc.problems]
            raise ConfigError(f"invalid dataset spec {value!r}", problems) from None

    @property
    def resolved_compare(self) -> str:
        """``compare`` with its default filled in (numeric for ``extract: last_number``)."""
        if self.compare is not None:
            return self.compare
        return "numeric" if self.extract == "last_number" else "exact"

    def data_spec(self) -> DataSpec:
        """The plain :class:`DataSpec` part (what :func:`~evomerge_opt.fitness.data.load_windows` reads)."""
        keys = set(DataSpec.model_fields) & self.model_fields_set
        return DataSpec(**{k: getattr(self, k) for k in keys | {"name"}})


class LMEvalTaskSpec(BaseModel):
    """One lm-evaluation-harness task scored on the in-memory candidate.

    ``task``: a task name known to lm-eval (its own tasks, or one defined by a YAML under
    ``include_path``); ``metric``: the task's metric to use (``acc``, ``acc_norm``, ``exact_match`` ...;
    ``metric,filter`` picks a filter, default the task's first); ``limit``: the first N documents
    (default all); ``num_fewshot``: override the task's; ``name``: the dataset name in results (default
    ``task``).
    """

    model_config = ConfigDict(extra="forbid")

    task: str
    include_path: str | None = None
    limit: int | None = Field(None, ge=1)
    metric: str = "acc"
    weight: float = Field(1.0, gt=0)
    num_fewshot: int | None = Field(None, ge=0)
    name: str | None = None

    @field_validator("task", "metric")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _default_name(self) -> LMEvalTaskSpec:
        if self.name is None:
            self.name = self.task
        return self

    @property
    def metric_name(self) -> str:
        return self.metric.partition(",")[0]

    @property
    def filter_name(self) -> str | None:
        return self.metric.partition(",")[2] or None


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
        from evomerge_opt.fitness.metrics import METRICS

        name = value.get("metric", "perplexity")
        if name in METRICS:
            keys = METRICS.get(name).spec_keys
            defaults = {k: v for k, v in defaults.items() if k not in (WINDOW_KEYS | METRIC_KEYS) or k in keys}
    return FitnessDatasetSpec.parse(value, **defaults)  # type: ignore[return-value]


def parse_lm_eval_task(value: LMEvalTaskSpec | dict[str, Any] | str) -> LMEvalTaskSpec:
    """A :class:`LMEvalTaskSpec` from a spec, a mapping, or a bare task name (schema only: see :func:`lm_eval_problems`)."""
    if isinstance(value, LMEvalTaskSpec):
        return value
    if isinstance(value, str):
        value = {"task": value}
    if not isinstance(value, dict):
        raise ConfigError(f"An lm-eval entry is a task name or a mapping like {{task: NAME}}, but got {value!r}.")
    try:
        return LMEvalTaskSpec(**value)
    except ValidationError as exc:
        raise ConfigError(f"invalid lm-eval task {value!r}",
                          validation_problems(exc, LMEvalTaskSpec.model_fields, top="lm_eval")) from None


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_problems(spec: LMEvalTaskSpec, where: str = "lm_eval") -> list[str]:
    """Problems of one lm-eval entry that can be found without loading the task's data or any model:
    lm-eval installed, ``include_path`` a directory, the task known, the metric one the task's YAML lists."""
    if not lm_eval_available():
        return [f"{where}: lm-evaluation-harness is not installed; install it with `{LMEVAL_INSTALL}`."]
    from evomerge_opt.fitness.lmeval import task_problems

    return [f"{where}: {p}" for p in task_problems(spec)]


def _entry_problems(index: int, entry: Any, check_data: bool) -> tuple[str | None, list[str]]:
    where = f"fitness.datasets[{index}]"
    try:
        spec = parse_fitness_dataset(entry)
    except ConfigError as exc:
        return None, [f"{where}: {p}" for p in exc.problems]
    if not check_data:
        return spec.name, []
    from evomerge_opt.errors import ModelSourceError
    from evomerge_opt.fitness.records import check_dataset

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
    from evomerge_opt.fitness.combine import objective_for
    from evomerge_opt.fitness.metrics import METRICS

    kinds, directions, names = [], [], []
    for entry in datasets:
        spec = parse_fitness_dataset(entry)
        metric = METRICS.get(spec.metric)
        kinds.append(metric.kind)
        directions.append(metric.direction)
        names.append(spec.name or "")
    for entry in lm_eval:
        from evomerge_opt.fitness.lmeval import metric_kind

        spec = parse_lm_eval_task(entry)
        kind = metric_kind(spec.metric_name)
        kinds.append(kind)
        directions.append("maximize" if kind == "accuracy" else "minimize")
        names.append(spec.name or spec.task)
    if multi_objective:
        return names, directions
    name, direction = objective_for(kinds)
    return [name], [direction]
