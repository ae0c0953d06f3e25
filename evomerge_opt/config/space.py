"""Search spaces: what an evolutionary search may change, over which ranges, scored how.

A search space is a YAML file (``search_spaces/*.yaml``) validated here *before* anything heavy runs
(no model is loaded; ``evo-merge validate`` reports every problem at once)::

    study: pico_ps_dfs            # optional default study name (else the file's stem)
    kind: ps+dfs                  # ps | dfs | ps+dfs
    pool:                         # the model pool in seed 000's form
      models: {_pretrained_: zoo:base, math: zoo:math, lang: zoo:lang}
      model_kwargs: {dtype: float32}      # torch_dtype is accepted as an alias
      tokenizer: zoo:base                 # default: the _pretrained_ model (else the first model)
    ps:                           # parameter-space part (kind ps or ps+dfs)
      sources: [math, lang]       # pool models merged onto _pretrained_ (default: every other pool model)
      methods: [ties, dare_ties, task_arithmetic]   # one = fixed; several = a categorical coordinate
      sparsify: [magnitude]       # optional; one = fixed; several = categorical; omitted = method default
      granularity: global         # global | per_layer | {groups: N} (contiguous blocks of layers)
      weight: {low: 0.0, high: 1.5}
      density: {low: 0.1, high: 1.0}
      lambda: {low: 0.5, high: 1.5}       # optional (omitted: 1); a plain number fixes a value
      normalize: null             # optional fixed global; null = method default
      rescale: null               # optional fixed global (inverse_density | l1 | none)
      dtype: float32              # dtype of the recipe's output
      seed: 0                     # seed of the recipe's random (DARE) masks
    dfs:                          # data-flow-space part (kind dfs or ps+dfs)
      num_r: 2
      sources: [ps, lang, math]   # pool model names; 'ps' = the PS-merged candidate (ps+dfs only)
      scaling: {low: 0.5, high: 1.5, log: false}  # one scalar per slot (a number fixes it)
      bias: false                 # false, or a range: one scalar bias per slot
      mask_threshold: 0.5         # a slot is on when its coordinate is above this
      input_layer_model: 0        # index into sources (or a source name): embeddings
      output_layer_model: 0       # index into sources (or a source name): final norm + head
    fitness:
      datasets: [{name: target, path: zoo:data/math_lang/dev.jsonl, weight: 1.0, seq_len: 64}]
      batch_size: 16
      multi_objective: false      # true: one objective per dataset (NSGA-II by default)
    sampler: {name: cmaes, seed: 0, sigma0: 0.25, popsize: null, restarts: 0}
    pruner: {name: median, n_warmup_steps: 1}    # median | wilcoxon | threshold | percentile | none
    budget: {trials: 200}
    baselines: true               # enqueue the untuned baselines as the first trials

Every searched value is a coordinate in ``[0, 1]`` (see :mod:`evomerge_opt.search.codec`); a range is
``{low, high, log}`` (``log`` needs ``low > 0``); a plain number fixes the value (not searched).

``load_space(path_or_dict) -> SearchSpace`` raises :class:`~evomerge_opt.errors.ConfigError` listing
every problem; ``SearchSpace.to_dict()`` gives plain data (stored as the study's ``space`` attribute,
from which ``evo-merge worker`` rebuilds the space).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge_opt.config.names import (
    METHOD_NAMES,
    PRUNER_NAMES,
    RESCALES,
    SAMPLER_NAMES,
    SPARSIFIER_NAMES,
    STUDY_NAME_PATTERN,
)
from evomerge_opt.errors import ConfigError, validation_problems

KINDS = ("ps", "dfs", "ps+dfs")
PS_SOURCE = "ps"
PRETRAINED = "_pretrained_"


class Range(BaseModel):
    """A searched float: ``low <= value <= high``, mapped linearly (or in log space) onto ``[0, 1]``."""

    model_config = ConfigDict(extra="forbid")

    low: float
    high: float
    log: bool = False

    def problems(self, where: str) -> list[str]:
        out = []
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            out.append(f"{where}: `low` and `high` must be finite, but got ({self.low}, {self.high}).")
        elif self.low > self.high:
            out.append(f"{where}: `low <= high` must hold, but got (low={self.low}, high={self.high}).")
        if self.log and not self.low > 0:
            out.append(f"{where}: a log range needs `low > 0`, but got low={self.low}; use log: false or low > 0.")
        return out


RangeOrFixed = Range | float


class PoolSpec(BaseModel):
    """The model pool in seed 000's YAML form (plain references only)."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, str]
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _refs(cls, value: Any) -> Any:
        # Also accept seed 000's `{_target_: ..., pretrained_model_name_or_path: REF}` entries.
        if isinstance(value, dict):
            return {
                k: (v.get("pretrained_model_name_or_path", v) if isinstance(v, dict) else v) for k, v in value.items()
            }
        return value

    @property
    def dtype(self) -> str | None:
        value = self.model_kwargs.get("dtype", self.model_kwargs.get("torch_dtype"))
        return None if value is None else str(value).removeprefix("torch.")

    @property
    def tokenizer_ref(self) -> str:
        if self.tokenizer:
            return self.tokenizer
        return self.models.get(PRETRAINED) or next(iter(self.models.values()))


class Groups(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: int = Field(ge=1)


class PSSpace(BaseModel):
    """The parameter-space part of a search."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    sources: list[str] | None = None
    methods: list[str] = Field(default_factory=lambda: ["ties"])
    sparsify: list[str] | None = None
    granularity: Literal["global", "per_layer"] | Groups = "global"
    weight: RangeOrFixed = Field(default_factory=lambda: Range(low=0.0, high=1.5))
    density: RangeOrFixed = Field(default_factory=lambda: Range(low=0.1, high=1.0))
    lambda_: RangeOrFixed | None = Field(default=None, alias="lambda")
    normalize: bool | None = None
    rescale: str | None = None
    dtype: str | None = None
    seed: int = 0

    @field_validator("methods", "sparsify", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class DFSSpace(BaseModel):
    """The data-flow-space part of a search."""

    model_config = ConfigDict(extra="forbid")

    num_r: int = Field(1, ge=1)
    sources: list[str]
    scaling: RangeOrFixed = 1.0
    bias: Literal[False] | RangeOrFixed = False
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    input_layer_model: int | str = 0
    output_layer_model: int | str = 0
    dtype: str | None = None


class FitnessSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[dict[str, Any]]
    batch_size: int = Field(8, ge=1)
    multi_objective: bool = False


class SamplerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "cmaes"
    seed: int | None = 0
    sigma0: float = Field(0.25, gt=0.0, le=1.0)
    popsize: int | None = Field(None, ge=2)
    restarts: int = Field(0, ge=0)  # pycma: IPOP restarts (population doubles at each)
    n_startup_trials: int = Field(10, ge=0)  # tpe
    options: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments of the sampler


class PrunerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "none"
    n_startup_trials: int = Field(3, ge=0)
    n_warmup_steps: int = Field(1, ge=0)
    upper: float | None = None  # threshold: prune when the running perplexity exceeds this
    percentile: float = Field(25.0, gt=0.0, lt=100.0)
    p_threshold: float = Field(0.1, gt=0.0, lt=1.0)  # wilcoxon


class BudgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trials: int = Field(100, ge=1)


class SearchSpace(BaseModel):
    """A validated search space (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    study: str | None = None
    kind: Literal["ps", "dfs", "ps+dfs"]
    pool: PoolSpec
    ps: PSSpace | None = None
    dfs: DFSSpace | None = None
    fitness: FitnessSpace
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    baselines: bool = True
    device: str | None = None

    # ---- derived views -------------------------------------------------------------------------

    @property
    def has_ps(self) -> bool:
        return self.kind in ("ps", "ps+dfs")

    @property
    def has_dfs(self) -> bool:
        return self.kind in ("dfs", "ps+dfs")

    def ps_sources(self) -> list[str]:
        """Pool names merged by the PS part (in order)."""
        if self.ps is None:
            return []
        if self.ps.sources is not None:
            return list(self.ps.sources)
        return [name for name in self.pool.models if name != PRETRAINED]

    def dfs_source_index(self, value: int | str) -> int:
        assert self.dfs is not None
        return value if isinstance(value, int) else self.dfs.sources.index(value)

    def dataset_names(self) -> list[str]:
        from evomerge_opt.data.spec import DataSpec

        return [DataSpec.parse(d).name or f"data{i}" for i, d in enumerate(self.fitness.datasets)]

    def objective_names(self) -> list[str]:
        return self.dataset_names() if self.fitness.multi_objective else ["perplexity"]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=False)

    # ---- checks ----------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every cross-field rule this space breaks (the schema itself is checked by pydantic)."""
        from evomerge_opt.config.dtypes import DTYPE_ALIASES as DTYPES

        out: list[str] = []
        pool = self.pool.models
        if not pool:
            out.append("pool.models: at least one model is required.")
        dtype = self.pool.dtype
        if dtype is not None and dtype.lower() not in DTYPES:
            out.append(f"pool.model_kwargs.dtype: unknown dtype {dtype!r}; valid dtypes are: {', '.join(sorted(DTYPES))}.")

        if self.has_ps and self.ps is None:
            out.append(f"ps: kind {self.kind!r} needs a `ps:` section.")
        if self.has_dfs and self.dfs is None:
            out.append(f"dfs: kind {self.kind!r} needs a `dfs:` section.")
        if not self.has_ps and self.ps is not None:
            out.append(f"ps: kind {self.kind!r} has no parameter-space part; remove `ps:` or use kind ps+dfs.")
        if not self.has_dfs and self.dfs is not None:
            out.append(f"dfs: kind {self.kind!r} has no data-flow part; remove `dfs:` or use kind ps+dfs.")

        if self.ps is not None and self.has_ps:
            ps = self.ps
            methods = METHOD_NAMES
            if not ps.methods:
                out.append("ps.methods: at least one merge method is required.")
            for name in ps.methods:
                if name not in methods:
                    out.append(f"ps.methods: unknown merge method {name!r}; valid merge methods are: {', '.join(methods)}.")
            if len(set(ps.methods)) != len(ps.methods):
                out.append(f"ps.methods: names must be unique, but got {ps.methods}.")
            needs_base = any(m != "linear" for m in ps.methods)
            if needs_base and PRETRAINED not in pool:
                out.append(
                    f"pool.models: methods {ps.methods} need a base model; name it `{PRETRAINED}` in pool.models."
                )
            for name in ps.sparsify or []:
                if name not in SPARSIFIER_NAMES:
                    out.append(f"ps.sparsify: unknown sparsifier {name!r}; valid sparsifiers are: {', '.join(SPARSIFIER_NAMES)}.")
            if ps.sparsify is not None and not ps.sparsify:
                out.append("ps.sparsify: give at least one sparsifier, or omit the key for the method default.")
            if ps.rescale is not None and ps.rescale not in RESCALES:
                out.append(f"ps.rescale: must be one of {', '.join(RESCALES)}, but got {ps.rescale!r}.")
            if ps.dtype is not None and ps.dtype.lower() not in DTYPES:
                out.append(f"ps.dtype: unknown dtype {ps.dtype!r}; valid dtypes are: {', '.join(sorted(DTYPES))}.")
            sources = self.ps_sources()
            if not sources:
                out.append("ps.sources: at least one source model (other than _pretrained_) is required.")
            for name in sources:
                if name not in pool:
                    out.append(f"ps.sources: {name!r} is not a pool model; pool models are: {', '.join(pool)}.")
                elif name == PRETRAINED:
                    out.append("ps.sources: `_pretrained_` is the base of the merge, not a source; remove it.")
            for key, value in (("weight", ps.weight), ("density", ps.density), ("lambda", ps.lambda_)):
                out.extend(_value_problems(f"ps.{key}", value))
            density = ps.density
            low, high = (density.low, density.high) if isinstance(density, Range) else (density, density)
            if not (0 < low <= 1 and 0 < high <= 1):
                out.append(f"ps.density: `0 < density <= 1` must hold over the range, but got [{low}, {high}].")
            if isinstance(ps.granularity, Groups) and ps.granularity.groups < 1:
                out.append("ps.granularity.groups: must be >= 1.")

        if self.dfs is not None and self.has_dfs:
            dfs = self.dfs
            if not dfs.sources:
                out.append("dfs.sources: at least one source is required.")
            for name in dfs.sources:
                if name == PS_SOURCE:
                    if self.kind != "ps+dfs":
                        out.append("dfs.sources: 'ps' (the PS-merged candidate) is only available with kind ps+dfs.")
                elif name not in pool:
                    out.append(
                        f"dfs.sources: {name!r} is not a pool model; pool models are: {', '.join(pool)}"
                        + (" (or 'ps' for the PS-merged candidate)." if self.kind == "ps+dfs" else ".")
                    )
            if len(set(dfs.sources)) != len(dfs.sources):
                out.append(f"dfs.sources: names must be unique, but got {dfs.sources}.")
            if self.kind == "ps+dfs" and PS_SOURCE not in dfs.sources:
                out.append("dfs.sources: kind ps+dfs routes through the PS-merged model; add 'ps' to dfs.sources.")
            for key in ("input_layer_model", "output_layer_model"):
                value = getattr(dfs, key)
                if isinstance(value, str):
                    if value not in dfs.sources:
                        out.append(f"dfs.{key}: {value!r} is not one of dfs.sources {dfs.sources}.")
                elif not 0 <= value < max(len(dfs.sources), 1):
                    out.append(f"dfs.{key}: `0 <= index < {len(dfs.sources)}` must hold, but got {value}.")
            out.extend(_value_problems("dfs.scaling", dfs.scaling))
            if dfs.bias is not False:
                out.extend(_value_problems("dfs.bias", dfs.bias))

        if not self.fitness.datasets:
            out.append("fitness.datasets: at least one dataset is required.")
        names = []
        for i, data in enumerate(self.fitness.datasets):
            try:
                from evomerge_opt.data.spec import DataSpec

                names.append(DataSpec.parse(data).name)
            except ConfigError as exc:
                out.extend(f"fitness.datasets[{i}]: {p}" for p in exc.problems)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            out.append(f"fitness.datasets: names must be unique, but {duplicates} repeat; set `name:`.")

        multi = self.fitness.multi_objective
        if self.sampler.name not in SAMPLER_NAMES:
            out.append(f"sampler.name: unknown sampler {self.sampler.name!r}; valid samplers are: {', '.join(SAMPLER_NAMES)}.")
        elif multi and self.sampler.name in ("cmaes", "pycma"):
            out.append(
                f"sampler.name: {self.sampler.name!r} optimises one objective, but fitness.multi_objective is "
                "true; use nsgaii (default for several objectives), tpe or random."
            )
        if self.pruner.name not in PRUNER_NAMES:
            out.append(f"pruner.name: unknown pruner {self.pruner.name!r}; valid pruners are: {', '.join(PRUNER_NAMES)}.")
        if multi and self.pruner.name != "none":
            out.append("pruner.name: Optuna cannot prune multi-objective trials; use pruner {name: none}.")
        if self.pruner.name == "threshold" and self.pruner.upper is None:
            out.append("pruner.upper: the threshold pruner needs `upper` (a running perplexity above it is pruned).")
        if self.study is not None and not STUDY_NAME_PATTERN.match(self.study):
            out.append(f"study: must match {STUDY_NAME_PATTERN.pattern!r}, but got {self.study!r}.")
        return out

    def check_sources(self) -> None:
        """Every pool reference, tokenizer and data file must exist (cheap; no model is loaded)."""
        from evomerge_opt.data.spec import DataSpec
        from evomerge_opt.errors import ModelSourceError
        from evomerge_opt.io.sources import resolve_model_ref

        problems = []
        refs = [(f"pool.models.{k}", v) for k, v in self.pool.models.items()]
        refs.append(("pool.tokenizer", self.pool.tokenizer_ref))
        for where, ref in refs:
            try:
                resolve_model_ref(ref)
            except ModelSourceError as exc:
                problems.append(f"{where}: {exc}")
        for i, data in enumerate(self.fitness.datasets):
            spec = DataSpec.parse(data)
            if spec.path is not None:
                try:
                    resolve_model_ref(spec.path)
                except ModelSourceError as exc:
                    problems.append(f"fitness.datasets[{i}].path: {exc}")
        if problems:
            raise ConfigError("the search space names models or data that cannot be found:", problems)


def _value_problems(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, Range):
        return value.problems(where)
    if not math.isfinite(float(value)):
        return [f"{where}: must be finite, but got {value}."]
    return []


def load_space(space: str | os.PathLike[str] | dict[str, Any] | SearchSpace) -> SearchSpace:
    """A validated :class:`SearchSpace` from a YAML path, a mapping or a space (every problem at once)."""
    if isinstance(space, SearchSpace):
        data, source = space.to_dict(), "search space"
    elif isinstance(space, (str, os.PathLike)):
        from evomerge_opt.config.yamlio import load_yaml

        data, source = load_yaml(space), str(space)
    else:
        data, source = space, "search space"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a search space is a mapping (kind, pool, fitness, ...), but got {type(data).__name__}.")
    try:
        parsed = SearchSpace.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ConfigError(f"{source} is not a valid search space:", problems) from None
    problems = parsed.problems()
    if problems:
        raise ConfigError(f"{source} is not a valid search space:", problems)
    return parsed


def default_study_name(space: SearchSpace, space_path: str | os.PathLike[str] | None) -> str:
    """The space's ``study`` key, else the space file's stem."""
    if space.study:
        return space.study
    if space_path is not None:
        return Path(space_path).stem
    raise ConfigError("No study name: pass --study NAME or set `study:` in the search space.")
