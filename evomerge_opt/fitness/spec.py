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

* :class:`FitnessDatasetSpec` extends :class:`~evomerge_opt.data.spec.DataSpec` (path/hub, name,
  weight, ``num_samples``, ``shuffle``/``seed``) with ``metric`` and the metric's own keys. The keys of
  windowed perplexity data (``seq_len``, ``packing``, ``text_field``, ...) belong to ``perplexity`` only;
  an accuracy metric's keys (``prompt_field``, ``extract``, ...) to that metric only. Setting a key the
  metric does not read is an error, never silently ignored.
* :class:`LMEvalTaskSpec`: an lm-evaluation-harness task.
* :func:`parse_lm_eval_task`. The rules that need the metrics (:func:`~evomerge_opt.fitness.checks.parse_fitness_dataset`,
  ``fitness_problems``, ``fitness_objectives``) are in :mod:`evomerge_opt.fitness.checks`: this module
  is the schema only, below the metrics that read it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge_opt.data.spec import DataSpec
from evomerge_opt.errors import ConfigError, validation_problems

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
        """The plain :class:`DataSpec` part (what :func:`~evomerge_opt.data.windows.load_windows` reads)."""
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
