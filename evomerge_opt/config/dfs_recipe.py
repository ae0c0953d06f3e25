"""Data-flow-space (DFS) merge recipes in the reference implementation's format.

A recipe::

    model_paths:                       # M source models
      - ["path/or/hub-id", null]       # [path, revision-or-null]; a plain string works too
      - zoo:math
      - merge_method: ties             # PS+DFS: an inline parameter-space recipe, merged in memory first
        base_model: zoo:base
        models: [{model: zoo:math}, {model: zoo:lang}]
    num_r: 1                           # repetitions of the M x L grid
    layer_mask:                        # [num_r][M][L_m] booleans; hop order: r, then m, then l
      - - [true, true, false, true]    # r=0, model 0
        - [false, false, true, false]  # r=0, model 1
    scaling_factors:                   # optional (default 1), same [num_r][M][L_m] shape as layer_mask;
      - - [1.0, 0.9, 1.0, 1.0]         # each entry a scalar, a D-vector or a D x D matrix (h @ S.T)
        - [1.0, 1.0, 1.1, 1.0]
    bias_factors: null                 # optional (default 0), same shape; each entry a scalar or a D-vector
    input_layer_model: 0               # embeddings from this model
    output_layer_model: 0              # final norm and head from this model
    dtype: bfloat16                    # optional: dtype of the saved model (default bfloat16)
    seed: 0                            # optional, recorded for provenance

Only the entries of ``scaling_factors`` / ``bias_factors`` at selected slots (mask true) are used. An
entry may be ``null``: no scaling (S = 1) / no bias (b = 0) at that hop, at no cost. Structural rules are checked
here, without loading a model; rules that need the models (hidden size, vocabulary, number of layers,
vector lengths) are checked by :func:`evomerge_opt.dfs.build.build_dfs_candidate`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from evomerge_opt.errors import ConfigError, validation_problems

TASKS = ("auto", "causal_lm", "sequence_classification")


class DFSSource(BaseModel):
    """One entry of ``model_paths``: a model reference (+ revision) or an inline PS recipe."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    revision: str | None = None
    ps_recipe: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        if self.ps_recipe is not None:
            method = self.ps_recipe.get("merge_method", "?")
            return f"<{method} merge of {len(self.ps_recipe.get('models', []) or [])} models>"
        return self.path if self.revision is None else f"{self.path}@{self.revision}"

    def to_yaml(self) -> Any:
        if self.ps_recipe is not None:
            return dict(self.ps_recipe)
        return [self.path, self.revision]


def _parse_source(entry: Any, index: int) -> DFSSource | str:
    """A ``DFSSource`` or the problem with ``entry``."""
    where = f"model_paths[{index}]"
    if isinstance(entry, (str, os.PathLike)):
        text = os.fspath(entry)
        return DFSSource(path=text) if text else f"{where}: an empty path; give a model directory, zoo:NAME or hub id."
    if isinstance(entry, (list, tuple)):
        if len(entry) not in (1, 2) or not isinstance(entry[0], str) or not entry[0]:
            return f"{where}: must be [path, revision-or-null], but got {entry!r}."
        revision = entry[1] if len(entry) == 2 else None
        if revision is not None and not isinstance(revision, str):
            return f"{where}: the revision must be a string or null, but got {revision!r}."
        return DFSSource(path=entry[0], revision=revision)
    if isinstance(entry, dict):
        if "merge_method" not in entry:
            return (
                f"{where}: a mapping here must be an inline parameter-space recipe (with merge_method, "
                f"base_model, models...), but it has keys {sorted(entry)}."
            )
        return DFSSource(ps_recipe=dict(entry))
    return f"{where}: must be a path, [path, revision] or an inline PS recipe mapping, but got {entry!r}."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def factor_kind(value: Any, allow_matrix: bool) -> tuple[str, int | None] | str:
    """``(kind, D)`` of a scaling/bias entry (kind scalar/vector/matrix, D its size or None), or a problem."""
    if _is_number(value):
        return "scalar", None
    if isinstance(value, (list, tuple)) and value:
        if all(_is_number(v) for v in value):
            return "vector", len(value)
        if allow_matrix and all(isinstance(row, (list, tuple)) for row in value):
            size = len(value)
            if any(len(row) != size for row in value):
                lengths = sorted({len(row) for row in value})
                return f"a matrix factor must be square (D x D), but got {size} rows of lengths {lengths}"
            if not all(_is_number(v) for row in value for v in row):
                return "a matrix factor must contain finite numbers only"
            return "matrix", size
    allowed = "a number, a list of D numbers or a D x D list of lists" if allow_matrix else "a number or a list of D numbers"
    return f"must be {allowed} (finite), but got {_short(value)}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DFSRecipe(BaseModel):
    """A data-flow-space merge recipe (the reference DFS keys; see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    model_paths: list[Any]
    num_r: int = 1
    layer_mask: list[Any]
    scaling_factors: Any = None
    bias_factors: Any = None
    input_layer_model: int = 0
    output_layer_model: int = 0
    dtype: str | None = None
    seed: int | None = None
    task: Literal["auto", "causal_lm", "sequence_classification"] = "auto"
    name: str | None = None
    provenance: dict[str, Any] | None = None

    _sources: list[DFSSource] = PrivateAttr(default_factory=list)
    _source_dir: Path | None = PrivateAttr(default=None)

    # ---- derived views ---------------------------------------------------------------------------

    @property
    def sources(self) -> list[DFSSource]:
        if not self._sources:
            self._sources = [s for s in (_parse_source(e, i) for i, e in enumerate(self.model_paths)) if not isinstance(s, str)]
        return self._sources

    @property
    def num_models(self) -> int:
        return len(self.model_paths)

    def layers_per_model(self) -> list[int]:
        """``L_m`` of every model, as the mask gives it (its first repetition)."""
        return [len(row) for row in self.layer_mask[0]] if self.layer_mask else []

    def hops(self) -> list[tuple[int, int, int]]:
        """The path: ``(r, m, l)`` of every selected slot in hop order (r, then m, then l)."""
        path = []
        for r, block in enumerate(self.layer_mask):
            for m, row in enumerate(block):
                for l, on in enumerate(row):
                    if bool(on):
                        path.append((r, m, l))
        return path

    def scale_at(self, r: int, m: int, l: int) -> Any:
        """The scaling entry of a slot (None when no scaling_factors: S = 1)."""
        return None if self.scaling_factors is None else self.scaling_factors[r][m][l]

    def bias_at(self, r: int, m: int, l: int) -> Any:
        """The bias entry of a slot (None when no bias_factors: b = 0)."""
        return None if self.bias_factors is None else self.bias_factors[r][m][l]

    def output_dtype_name(self) -> str:
        return self.dtype or "bfloat16"

    def resolve_ref(self, ref: str) -> str:
        """A model reference relative to the CWD, else to the recipe file's directory."""
        from evomerge_opt.io.sources import resolve_model_ref

        relative = self._source_dir is not None and not ref.startswith("zoo:") and not Path(ref).expanduser().is_absolute()
        if relative and not Path(ref).exists() and (self._source_dir / ref).exists():
            return resolve_model_ref(self._source_dir / ref)
        return resolve_model_ref(ref)

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the seed's key order, for ``save_yaml``."""
        out: dict[str, Any] = {
            "model_paths": [s.to_yaml() for s in self.sources],
            "num_r": self.num_r,
            "layer_mask": [[[bool(v) for v in row] for row in block] for block in self.layer_mask],
            "scaling_factors": self.scaling_factors,
            "bias_factors": self.bias_factors,
            "input_layer_model": self.input_layer_model,
            "output_layer_model": self.output_layer_model,
        }
        for key in ("dtype", "seed", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.task != "auto":
            out["task"] = self.task
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out

    # ---- checks ----------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every structural rule this recipe breaks (no model is loaded)."""
        problems: list[str] = []
        parsed = [_parse_source(e, i) for i, e in enumerate(self.model_paths)]
        problems.extend(p for p in parsed if isinstance(p, str))
        num_models = len(self.model_paths)
        if num_models == 0:
            problems.append("model_paths: at least one source model is required.")
        if self.num_r < 1:
            problems.append(f"num_r: `num_r >= 1` must hold, but got num_r={self.num_r}.")
        for key in ("input_layer_model", "output_layer_model"):
            value = getattr(self, key)
            if num_models and not 0 <= value < num_models:
                problems.append(
                    f"{key}: `0 <= {key} < len(model_paths)` must hold, but got {key}={value} with "
                    f"{num_models} models; use an index in 0..{num_models - 1}."
                )
        if self.dtype is not None:
            from evomerge_opt.config.dtypes import DTYPE_ALIASES as DTYPES

            if str(self.dtype).removeprefix("torch.").lower() not in DTYPES:
                problems.append(f"dtype: unknown dtype {self.dtype!r}; valid dtypes are: {', '.join(sorted(DTYPES))}.")
        mask_problems = self._mask_problems(num_models)
        problems.extend(mask_problems)
        if not mask_problems:
            problems.extend(self._factor_problems("scaling_factors", self.scaling_factors, allow_matrix=True))
            problems.extend(self._factor_problems("bias_factors", self.bias_factors, allow_matrix=False))
        return problems

    def _mask_problems(self, num_models: int) -> list[str]:
        mask = self.layer_mask
        expected = f"[num_r={self.num_r}][M={num_models}][L]"
        if not isinstance(mask, list) or len(mask) != self.num_r:
            got = len(mask) if isinstance(mask, list) else type(mask).__name__
            return [
                (
                    f"layer_mask: expected shape {expected}, but its first dimension is {got} "
                    f"(num_r={self.num_r}); give one [M][L] block per repetition."
                )
            ]
        problems = []
        lengths: list[int] | None = None
        for r, block in enumerate(mask):
            if not isinstance(block, list) or len(block) != num_models:
                got = len(block) if isinstance(block, list) else type(block).__name__
                problems.append(
                    f"layer_mask[{r}]: expected shape {expected}, but it has {got} rows for {num_models} models; "
                    "give one row of booleans per model in model_paths."
                )
                continue
            row_lengths = []
            for m, row in enumerate(block):
                if not isinstance(row, list) or not row:
                    problems.append(f"layer_mask[{r}][{m}]: must be a non-empty list of booleans, but got {_short(row)}.")
                    row_lengths.append(-1)
                    continue
                bad = [v for v in row if not (isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)))]
                if bad:
                    problems.append(f"layer_mask[{r}][{m}]: entries must be true/false, but got {_short(bad[0])}.")
                row_lengths.append(len(row))
            if lengths is None:
                lengths = row_lengths
            elif row_lengths != lengths:
                problems.append(
                    f"layer_mask[{r}]: expected the same row lengths (layers per model) as layer_mask[0], "
                    f"{lengths}, but got {row_lengths}."
                )
        if not problems and not self.hops():
            problems.append(
                "layer_mask: the path is empty (no layer selected at all); set at least one entry to true."
            )
        return problems

    def _factor_problems(self, key: str, factors: Any, allow_matrix: bool) -> list[str]:
        if factors is None:
            return []
        expected = [[len(row) for row in block] for block in self.layer_mask]
        shape_text = f"[num_r={self.num_r}][M={len(expected[0])}][L={expected[0]}]"
        if not isinstance(factors, list) or len(factors) != len(expected):
            got = len(factors) if isinstance(factors, list) else _short(factors)
            return [f"{key}: expected the shape of layer_mask {shape_text}, but its first dimension is {got}."]
        problems = []
        sizes: dict[str, set[int]] = {}
        for r, block in enumerate(factors):
            if not isinstance(block, list) or len(block) != len(expected[r]):
                got = len(block) if isinstance(block, list) else _short(block)
                problems.append(f"{key}[{r}]: expected {len(expected[r])} rows (one per model), but got {got}.")
                continue
            for m, row in enumerate(block):
                if not isinstance(row, list) or len(row) != expected[r][m]:
                    got = len(row) if isinstance(row, list) else _short(row)
                    problems.append(
                        f"{key}[{r}][{m}]: expected {expected[r][m]} entries (one per layer, as layer_mask), "
                        f"but got {got}."
                    )
                    continue
                for l, value in enumerate(row):
                    if value is None:  # the default: S = 1 / b = 0
                        continue
                    kind = factor_kind(value, allow_matrix)
                    if isinstance(kind, str):
                        problems.append(f"{key}[{r}][{m}][{l}]: {kind}.")
                    elif kind[1] is not None:
                        sizes.setdefault(kind[0], set()).add(kind[1])
        all_sizes = set().union(*sizes.values()) if sizes else set()
        if len(all_sizes) > 1:
            problems.append(
                f"{key}: every vector/matrix entry must have the hidden size D, but got sizes {sorted(all_sizes)}; "
                "use one D for all entries."
            )
        return problems

    def validate_or_raise(self, source: str = "recipe") -> DFSRecipe:
        problems = self.problems()
        if problems:
            raise ConfigError(f"{source} is not a valid data-flow-space recipe:", problems)
        self._sources = [s for s in (_parse_source(e, i) for i, e in enumerate(self.model_paths))]  # type: ignore[misc]
        return self


def parse_dfs_recipe(data: Any, source: str = "recipe", source_dir: Path | None = None) -> DFSRecipe:
    """Schema + structural checks of a DFS recipe mapping; every problem reported at once (ConfigError)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a DFS recipe must be a mapping of the DFS recipe keys (model_paths, layer_mask, ...), but got {_short(data)}.")
    try:
        recipe = DFSRecipe.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, DFSRecipe.model_fields)
        raise ConfigError(f"{source} is not a valid data-flow-space recipe:", problems) from None
    recipe._source_dir = source_dir
    return recipe.validate_or_raise(source)


def load_dfs_recipe(recipe: str | os.PathLike[str] | dict[str, Any] | DFSRecipe) -> DFSRecipe:
    """A validated :class:`DFSRecipe` from a YAML path (safe loader), a mapping, or a recipe object."""
    if isinstance(recipe, DFSRecipe):
        return recipe.validate_or_raise()
    if isinstance(recipe, (str, os.PathLike)):
        from evomerge_opt.config.yamlio import load_yaml

        return parse_dfs_recipe(load_yaml(recipe), str(recipe), Path(recipe).resolve().parent)
    return parse_dfs_recipe(recipe)
