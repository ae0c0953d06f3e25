"""Parameter-space (PS) merge recipes: the mergekit layout for the common subset, plus per-layer values.

A recipe::

    merge_method: ties                 # linear | task_arithmetic | ties | dare_ties | dare_linear
    base_model: path/or/hub-id         # required except for linear (then the first model is the reference)
    models:
      - model: path/to/finetune_a      # a local dir, `zoo:NAME`, a hub id, or a LoRA adapter directory
        parameters: {weight: 0.5, density: 0.5}
      - model: path/to/finetune_b
        parameters: {weight: 0.3, density: [0.2, 0.6]}   # a per-layer value (see below)
    parameters: {normalize: true, lambda: 1.0}           # globals (and defaults for weight/density)
    dtype: float32                     # output dtype (default: the base's); `out_dtype` wins if both
    seed: 0                            # seeds DARE masks: bit-for-bit reproducible
    tokenizer_source: base             # `base` (default) or a model reference
    resize_policy: error               # error | truncate_to_base (sources with a resized vocabulary)
    defaults: mergekit                 # mergekit (default) | evomerge-0.1: which defaults and rounding apply
    rng: v2                            # DARE mask scheme: v2 (default) | v1 (evo-merge 0.1's)

Recipes evo-merge writes always carry ``defaults`` and ``rng``. A recipe without them gets mergekit's
semantics, except one whose ``provenance.evomerge_version`` is 0.1.x (written before the fields
existed), which rebuilds with 0.1's (``evomerge-0.1``, ``v1``) so old studies stay reproducible.

Per-source parameters: ``weight`` (default 1), ``density`` (default 1, must be in (0, 1]).
Global parameters: ``normalize`` (default true; false for task_arithmetic), ``lambda`` (default 1),
``rescale`` (``inverse_density`` | ``l1`` | ``none``; default inverse_density for dare_*, none for
ties), ``sparsify`` (``magnitude`` | ``random`` | ``sparsegpt``; default magnitude for ties, random
for dare_*), and ``weight``/``density`` as defaults for every source. mergekit's ``int8_mask`` is
accepted and ignored (we always compute in float32).

**Per-layer values.** Any numeric parameter may be

* a scalar: the same for every tensor;
* a list of floats (mergekit's *gradient*): ``n`` anchors spread evenly over the decoder layers
  ``0..L-1`` (anchor ``j`` sits at layer ``j * (L-1) / (n-1)``), linearly interpolated in between.
  A list of length ``L`` therefore gives exactly one value per layer. This is what the search writes;
* a list of ``{filter: SUBSTRING, value: V}`` (``V`` a scalar or a gradient): the first entry whose
  ``filter`` occurs in the tensor name wins; an entry without ``filter`` is the default.

Tensors outside the decoder layers take the value at layer 0 (embeddings and anything before the
layers) or at layer ``L-1`` (final norm, ``lm_head``).

``load_recipe`` dispatches on keys: ``merge_method`` -> :class:`PSRecipe`; ``model_paths`` /
``layer_mask`` -> the DFS recipe of :mod:`evomerge_opt.config.dfs_recipe`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from evomerge_opt.config.names import METHOD_NAMES, RESCALES, SPARSIFIER_NAMES
from evomerge_opt.errors import ConfigError, validation_problems

SOURCE_KEYS = {"weight", "density"}
GLOBAL_KEYS = {"normalize", "lambda", "rescale", "sparsify", "weight", "density", "int8_mask"}
NUMERIC_KEYS = {"weight", "density", "lambda"}

LEGACY_VERSION_PREFIX = "0.1."


def is_legacy_provenance(provenance: dict[str, Any] | None) -> bool:
    """A recipe whose provenance names evo-merge 0.1.x: it predates the ``defaults``/``rng`` fields and
    rebuilds with that version's semantics (``defaults: evomerge-0.1``, ``rng: v1``)."""
    version = str((provenance or {}).get("evomerge_version") or "")
    return version.startswith(LEGACY_VERSION_PREFIX)


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_AFTER_LAYERS = ("norm.weight", "norm.bias", "lm_head", "score.")


class ModelEntry(BaseModel):
    """One source model with its per-source ``parameters``."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class PSRecipe(BaseModel):
    """A parameter-space merge recipe (see the module docstring for every key)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int = 0
    tokenizer_source: str | None = None
    resize_policy: Literal["error", "truncate_to_base"] = "error"
    name: str | None = None
    provenance: dict[str, Any] | None = None
    # Calibration data for `sparsify: sparsegpt`: a list of dataset specs, or {datasets: [...],
    # num_samples, seq_len, batch_size, per_source, damp, criterion} (see merge/sparsify/importance/provider.py).
    calibration: list[Any] | dict[str, Any] | None = None
    # Which semantics rebuild this recipe (see `effective_defaults` / `effective_rng`): recipes written
    # by evo-merge always carry both, so a later change of defaults or mask scheme never changes them.
    defaults: Literal["mergekit", "evomerge-0.1"] | None = None
    rng: Literal["v1", "v2"] | None = None

    _source_dir: Path | None = PrivateAttr(default=None)

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_strings(cls, value: Any) -> Any:
        # mergekit allows `- model: X` with no parameters; we also accept a bare string.
        if isinstance(value, list):
            return [{"model": item} if isinstance(item, str) else item for item in value]
        return value

    # ---- derived views -------------------------------------------------------------------------

    @property
    def output_dtype_name(self) -> str | None:
        return self.out_dtype or self.dtype

    def global_param(self, key: str, default: Any = None) -> Any:
        return self.parameters.get(key, default)

    def source_param(self, index: int, key: str, default: Any = None) -> Any:
        params = self.models[index].parameters
        if key in params:
            return params[key]
        return self.parameters.get(key, default)

    @property
    def legacy(self) -> bool:
        """Written by evo-merge 0.1 (its provenance says so) without explicit ``defaults``/``rng``."""
        return is_legacy_provenance(self.provenance)

    @property
    def effective_defaults(self) -> str:
        """``mergekit`` (mergekit's defaults and rounding) unless the recipe says otherwise or is legacy."""
        return self.defaults or ("evomerge-0.1" if self.legacy else "mergekit")

    @property
    def effective_rng(self) -> str:
        """DARE mask scheme: ``v2`` (counter-based, device-independent) unless set or legacy (``v1``)."""
        return self.rng or ("v1" if self.legacy else "v2")

    def resolve_ref(self, ref: str) -> str:
        """A model reference relative to the CWD, else to the recipe file's directory."""
        from evomerge_opt.io.sources import resolve_model_ref

        relative = self._source_dir is not None and not ref.startswith("zoo:") and not Path(ref).expanduser().is_absolute()
        if relative and not Path(ref).exists() and (self._source_dir / ref).exists():
            return resolve_model_ref(self._source_dir / ref)
        return resolve_model_ref(ref)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``save_yaml`` (keys in the familiar mergekit order, defaults left out)."""
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
        out: dict[str, Any] = {"merge_method": data["merge_method"]}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        out["models"] = [
            {"model": m.model, **({"parameters": m.parameters} if m.parameters else {})} for m in self.models
        ]
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["seed"] = self.seed
        out["defaults"] = self.effective_defaults
        out["rng"] = self.effective_rng
        if self.resize_policy != "error":
            out["resize_policy"] = self.resize_policy
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out

    # ---- checks ----------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every rule this recipe breaks (no model is loaded; local paths are checked to exist)."""
        from evomerge_opt.config.dtypes import DTYPE_ALIASES as DTYPES

        problems: list[str] = []
        if not is_method(self.merge_method):
            problems.append(
                f"merge_method: unknown merge method {self.merge_method!r}; valid merge methods are: "
                f"{', '.join(METHOD_NAMES)}."
            )
        if not self.models:
            problems.append("models: at least one source model is required.")
        if self.base_model is None and self.merge_method != "linear":
            problems.append(f"base_model: required for merge_method {self.merge_method!r} (only linear may omit it).")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and str(value).removeprefix("torch.").lower() not in DTYPES:
                problems.append(f"{key}: unknown dtype {value!r}; valid dtypes are: {', '.join(sorted(DTYPES))}.")
        for key, value in self.parameters.items():
            where = f"parameters.{key}"
            if key not in GLOBAL_KEYS:
                problems.append(f"{where}: unknown global parameter; valid ones are: {', '.join(sorted(GLOBAL_KEYS))}.")
            elif key in ("normalize", "int8_mask"):
                if not isinstance(value, bool):
                    problems.append(f"{where}: must be true or false, but got {value!r}.")
            elif key == "rescale":
                if value not in RESCALES:
                    problems.append(f"{where}: must be one of {', '.join(RESCALES)}, but got {value!r}.")
            elif key == "sparsify":
                if value not in SPARSIFIER_NAMES:
                    problems.append(f"{where}: unknown sparsifier {value!r}; valid sparsifiers are: {', '.join(SPARSIFIER_NAMES)}.")
            else:
                problems.extend(check_param_value(key, value, where))
        for index, entry in enumerate(self.models):
            for key, value in entry.parameters.items():
                where = f"models[{index}].parameters.{key}"
                if key not in SOURCE_KEYS:
                    hint = " (it is a global parameter: put it under the top-level `parameters`)" if key in GLOBAL_KEYS else ""
                    problems.append(f"{where}: unknown per-model parameter{hint}; valid ones are: {', '.join(sorted(SOURCE_KEYS))}.")
                else:
                    problems.extend(check_param_value(key, value, where))
        problems.extend(self._weight_problems())
        problems.extend(self._path_problems())
        return problems

    def _weight_problems(self) -> list[str]:
        if not self.models or not self.normalize_default_known():
            return []
        normalize = self.parameters.get("normalize", self.merge_method != "task_arithmetic")
        if normalize is not True:
            return []
        weights = [self.source_param(i, "weight", 1.0) for i in range(len(self.models))]
        if all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            total = float(sum(weights))
            if total <= 0:
                return [(
                    f"models[*].parameters.weight: with normalize on the total weight must be > 0 (it divides "
                    f"the merge), but the weights {weights} sum to {total:g}; make the total positive or set "
                    "parameters.normalize: false."
                )]
        return []

    def normalize_default_known(self) -> bool:
        return is_method(self.merge_method)

    def _path_problems(self) -> list[str]:
        from evomerge_opt.errors import ModelSourceError

        problems = []
        refs = [("base_model", self.base_model)] + [(f"models[{i}].model", m.model) for i, m in enumerate(self.models)]
        if self.tokenizer_source not in (None, "base"):
            refs.append(("tokenizer_source", self.tokenizer_source))
        for where, ref in refs:
            if ref is None:
                continue
            try:
                self.resolve_ref(ref)
            except ModelSourceError as exc:
                problems.append(f"{where}: {exc}")
        return problems

    def validate_or_raise(self, source: str = "recipe") -> PSRecipe:
        problems = self.problems()
        if problems:
            raise ConfigError(f"{source} is not a valid parameter-space recipe:", problems)
        return self


def is_method(name: str) -> bool:
    """Whether ``name`` is a merge method (:data:`~evomerge_opt.config.names.METHOD_NAMES`, no torch import)."""
    return name in METHOD_NAMES


def check_param_value(key: str, value: Any, where: str) -> list[str]:
    """Problems of a (possibly per-layer) numeric parameter value; density must lie in (0, 1]."""
    problems: list[str] = []
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for j, entry in enumerate(value):
            extra = set(entry) - {"filter", "value"}
            if extra or "value" not in entry:
                problems.append(f"{where}[{j}]: a filtered value is {{filter: SUBSTRING, value: V}}, but got {entry!r}.")
                continue
            if "filter" in entry and not isinstance(entry["filter"], str):
                problems.append(f"{where}[{j}].filter: must be a string, but got {entry['filter']!r}.")
            problems.extend(check_param_value(key, entry["value"], f"{where}[{j}].value"))
        return problems
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        return [f"{where}: an empty list is not a value; give a scalar or at least one anchor."]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append(f"{where}: must be a finite number (or a per-layer list of numbers), but got {v!r}.")
        elif key == "density" and not 0 < v <= 1:
            problems.append(f"{where}: `0 < density <= 1` must hold, but got density={v}; use a value in (0, 1].")
    return problems


def layer_index(tensor_name: str, num_layers: int) -> int:
    """Decoder layer of a tensor: its ``layers.N`` index; embeddings -> 0; final norm / head -> L-1."""
    match = _LAYER_RE.search(tensor_name)
    if match:
        return int(match.group(1))
    if any(marker in tensor_name for marker in _AFTER_LAYERS):
        return max(num_layers - 1, 0)
    return 0


def resolve_param(value: Any, tensor_name: str, layer_index: int | None, num_layers: int | None) -> Any:
    """The value of a parameter for one tensor (scalar, gradient list or filtered list; see module doc)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            pattern = entry.get("filter")
            if pattern is None or pattern in tensor_name:
                return resolve_param(entry["value"], tensor_name, layer_index, num_layers)
        raise ConfigError(
            f"No entry of the filtered value {value!r} matches tensor {tensor_name!r}; add a default entry "
            "without `filter`."
        )
    if isinstance(value, list):
        if len(value) == 1:
            return float(value[0])
        layers = num_layers or 1
        layer = layer_index if layer_index is not None else 0
        position = 0.0 if layers <= 1 else layer * (len(value) - 1) / (layers - 1)
        low = min(math.floor(position), len(value) - 1)
        high = min(low + 1, len(value) - 1)
        frac = position - low
        return float(value[low]) * (1.0 - frac) + float(value[high]) * frac if frac else float(value[low])
    return value


def recipe_kind(data: Any) -> str | None:
    """``"ps"``, ``"dfs"`` or ``None`` from a recipe mapping's keys."""
    if not isinstance(data, dict):
        return None
    if "merge_method" in data:
        return "ps"
    if "model_paths" in data or "layer_mask" in data:
        return "dfs"
    return None


def parse_ps_recipe(data: dict[str, Any], source: str = "recipe", source_dir: Path | None = None) -> PSRecipe:
    """Schema + rule checks of a PS recipe mapping; every problem reported at once as a ConfigError."""
    if "slices" in data:
        raise ConfigError(
            f"{source}: mergekit `slices` (layer-range merges) are not supported; list whole models under "
            "`models:` and use per-layer parameter values instead."
        )
    try:
        recipe = PSRecipe.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, PSRecipe.model_fields)
        raise ConfigError(f"{source} is not a valid parameter-space recipe:", problems) from None
    recipe._source_dir = source_dir
    return recipe.validate_or_raise(source)


def load_recipe(recipe: str | os.PathLike[str] | dict[str, Any] | Any) -> Any:
    """A :class:`PSRecipe` or ``DFSRecipe`` from a YAML path, a mapping, or an already parsed recipe."""
    if isinstance(recipe, PSRecipe):
        return recipe
    source, source_dir = "recipe", None
    if isinstance(recipe, (str, os.PathLike)):
        from evomerge_opt.config.yamlio import load_yaml

        source, source_dir = str(recipe), Path(recipe).resolve().parent
        data = load_yaml(recipe)
    elif isinstance(recipe, dict):
        data = recipe
    else:
        # An already parsed DFS recipe (or any other recipe object) passes through unchanged.
        return recipe
    kind = recipe_kind(data)
    if kind == "ps":
        return parse_ps_recipe(data, source, source_dir)
    if kind == "dfs":
        from evomerge_opt.config.dfs_recipe import load_dfs_recipe

        return load_dfs_recipe(recipe)  # the path itself, so relative model paths resolve beside it
    raise ConfigError(
        f"{source} is neither a parameter-space recipe (needs `merge_method`) nor a data-flow-space recipe "
        "(needs `model_paths` and `layer_mask`)."
    )
