"""In-memory PS merges for the search: one resident model rebuilt in place for every recipe.

``ResidentMerger`` loads the base model once (THE resident model, in the output dtype, on ``device``),
keeps the base weights ``b`` and every source's task vector ``d_i = x_i - b`` resident on the device in
float32, and ``build(recipe)`` computes each merged tensor from those and copies it into the resident
model's parameters (``param.data.copy_``). No disk, no ``from_pretrained`` per build; the same model
object is returned every time, so callers must not keep references to old weights.

Memory: ``(1 + n_sources) * params * 4`` bytes of float32 state plus the model itself, plus the
magnitude index below when it is on.

Magnitude index: for magnitude trimming (TIES' default) the merger keeps, per source and tensor, the
task vector's ``|d|`` sorted ascending, computed lazily the first time a build trims that tensor. The
exact threshold for any density is then a lookup (``sorted[numel - k]``) plus two binary searches for
the ties, and trimming is one elementwise pass, instead of a selection over the tensor per build. It
doubles the task vectors' memory, so it is on only while the index would fit in
``magnitude_index_budget`` bytes (default :data:`MAGNITUDE_INDEX_BUDGET`, 4 GiB: task vectors of up to
~1G parameters in all, e.g. two sources of a 500M model); ``magnitude_index=True/False`` forces it.
The results are identical either way (the same threshold, tie count and trimming).

The tensors equal :func:`~evomerge_opt.merge.engine.stream_merge`'s bit for bit: both read the
checkpoints with the same readers and merge with :meth:`RecipeParams.merge_tensor`. ``importance``
(a SparseGPT provider) is indexed by the recipe's ``models`` position, as in ``stream_merge``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from evomerge_opt.config.recipe import ModelEntry, PSRecipe, load_recipe
from evomerge_opt.errors import ConfigError
from evomerge_opt.merge._base import ImportanceProvider
from evomerge_opt.merge.methods import ResidentInputs
from evomerge_opt.merge.params import RecipeParams
from evomerge_opt.merge.sources import TIED_HEAD, MergeSources

logger = logging.getLogger(__name__)

MAGNITUDE_INDEX_BUDGET = 4 << 30  # bytes of sorted |d| the magnitude index may hold (auto mode)


class _IndexedInputs(ResidentInputs):
    """Resident inputs that also give the merger's (lazily computed) sorted ``|d|``."""

    def __init__(self, base, deltas, merger: ResidentMerger, name: str, positions: list[int]) -> None:
        super().__init__(base, deltas)
        self._merger, self._name, self._positions = merger, name, positions

    def sorted_magnitude(self, index):
        return self._merger._sorted_magnitude(self._positions[index], self._name)

    def has_negative_zero(self, index):
        return self._merger._negative_zero[(self._positions[index], self._name)]


class ResidentMerger:
    """Resident base + task vectors; :meth:`build` writes a recipe's merge into one resident model.

    ``ResidentMerger(recipe)`` takes base and sources from a PS recipe (path, dict or PSRecipe), or
    ``ResidentMerger(base_ref, [source_ref, ...])`` from references. Later recipes given to
    :meth:`build` must use the same base and a subset of these sources (matched by resolved path).
    """

    def __init__(
        self,
        base_or_recipe: Any,
        sources: list[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        importance: ImportanceProvider | None = None,
        resize_policy: str = "error",
        magnitude_index: bool | None = None,
        magnitude_index_budget: int = MAGNITUDE_INDEX_BUDGET,
    ) -> None:
        self.device = torch.device(device)
        self.importance = importance
        if sources is None:
            template = load_recipe(base_or_recipe)
            if not isinstance(template, PSRecipe):
                raise ConfigError("ResidentMerger needs a parameter-space recipe (or base_ref + source refs).")
            # Every model as a source (the base too if listed: linear may use it as an input).
            template = template.model_copy(update={"merge_method": "linear", "parameters": {}})
        else:
            template = PSRecipe(merge_method="linear", base_model=str(base_or_recipe),
                                models=[ModelEntry(model=str(ref)) for ref in sources], resize_policy=resize_policy)
            template._source_dir = None
        if template.base_model is None:
            raise ConfigError("ResidentMerger needs a base model (the resident model and the task vectors' origin).")
        self._sources = MergeSources(template)
        self.base_ref = self._sources.base_ref
        self.source_refs = list(self._sources.refs)
        self.num_layers = self._sources.num_layers
        self.dtype = self._sources.output_dtype(dtype)
        self._source_models: dict[int, Any] = {}
        self.model = self._load_resident_model()
        self._names = [name for name, _ in self.model.named_parameters()]
        self._base: dict[str, torch.Tensor] = {}
        self._deltas: list[dict[str, torch.Tensor]] = [{} for _ in self.source_refs]
        with torch.no_grad():
            for name in self._names:
                ckpt_name = self._checkpoint_name(name)
                base = self._sources.base.get_tensor(ckpt_name)
                b32 = base.to(device=self.device, dtype=torch.float32)
                self._base[name] = b32
                for j, x in enumerate(self._sources.read_sources(ckpt_name)):
                    self._deltas[j][name] = self._sources.delta(x, b32, j, base)
        self._sources.close()
        self.builds = 0
        if magnitude_index is None:
            entries = sum(t.numel() for deltas in self._deltas for t in deltas.values())
            magnitude_index = entries * 4 <= magnitude_index_budget
        self.magnitude_index = bool(magnitude_index)
        self._sorted: dict[tuple[int, str], torch.Tensor] = {}
        self._negative_zero: dict[tuple[int, str], bool] = {}

    def _load_resident_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self._sources.base_dir), dtype=self.dtype)
        return model.to(self.device).eval()

    def _checkpoint_name(self, name: str) -> str:
        if name in self._sources.base:
            return name
        if name == TIED_HEAD:
            return "model.embed_tokens.weight"
        raise ConfigError(f"Parameter {name!r} of the resident model is not in the base checkpoint {self.base_ref!r}.")

    # ---- building ------------------------------------------------------------------------------------

    def _source_positions(self, recipe: PSRecipe) -> tuple[list[int], list[int]]:
        """(recipe.models indices taking part, matching resident source positions)."""
        from evomerge_opt.merge.methods import get_method

        if recipe.base_model is not None and not _same(recipe.resolve_ref(recipe.base_model), self.base_ref):
            raise ConfigError(f"The recipe's base_model {recipe.base_model!r} is not this merger's base {self.base_ref!r}.")
        method = get_method(recipe.merge_method)
        indices, positions = [], []
        for index, entry in enumerate(recipe.models):
            ref = recipe.resolve_ref(entry.model)
            if method.needs_base and _same(ref, self.base_ref):
                continue
            matches = [p for p, source in enumerate(self.source_refs) if _same(source, ref)]
            if not matches:
                raise ConfigError(
                    f"models[{index}] {entry.model!r} is not resident in this merger (sources: {self.source_refs}); "
                    "create the ResidentMerger with every model the recipes use."
                )
            indices.append(index)
            positions.append(matches[0])
        if not indices:
            raise ConfigError("The recipe has no source model other than the base.")
        return indices, positions

    @torch.no_grad()
    def build(self, recipe: str | os.PathLike[str] | dict[str, Any] | PSRecipe) -> Any:
        """Write ``recipe``'s merge into the resident model's parameters and return that model."""
        recipe = load_recipe(recipe)
        if not isinstance(recipe, PSRecipe):
            raise ConfigError("ResidentMerger.build needs a parameter-space recipe.")
        indices, positions = self._source_positions(recipe)
        params = RecipeParams(recipe, self.num_layers, self.importance, indices)
        for name, param in self.model.named_parameters():
            deltas = [self._deltas[p][name] for p in positions]
            if self.magnitude_index:
                inputs = _IndexedInputs(self._base[name], deltas, self, name, positions)
            else:
                inputs = ResidentInputs(self._base[name], deltas)
            if param.data.is_contiguous():
                params.merge_into(name, inputs, param.data)  # straight into the resident weights
            else:  # pragma: no cover - HF parameters are contiguous
                param.data.copy_(params.merge_into(name, inputs, torch.empty_like(param.data)))
        self.builds += 1
        return self.model

    def _sorted_magnitude(self, position: int, name: str) -> torch.Tensor:
        """``|d|`` of resident source ``position``'s tensor ``name``, flat and sorted (kept)."""
        key = (position, name)
        ordered = self._sorted.get(key)
        if ordered is None:
            delta = self._deltas[position][name].reshape(-1)
            if delta.device.type == "cpu":  # numpy's sort is ~4x faster than torch's on CPU
                values = delta.numpy()
                ordered = torch.from_numpy(np.sort(np.abs(values)))
                negative_zero = bool(np.signbit(values[values == 0]).any())
            else:
                ordered = torch.sort(delta.abs()).values
                negative_zero = bool(torch.signbit(delta[delta == 0]).any())
            self._sorted[key], self._negative_zero[key] = ordered, negative_zero
        return ordered

    # ---- full source models (DFS routing) -------------------------------------------------------------

    def source_model(self, index: int) -> Any:
        """Source ``index`` as a full model (loaded once, lazily; LoRA adapters merged onto the base)."""
        if index not in self._source_models:
            from evomerge_opt.pool import load_causal_lm

            self._source_models[index] = load_causal_lm(
                self.source_refs[index], dtype=self.dtype, device=self.device, base_model=self.base_ref
            )
        return self._source_models[index]

    @property
    def models(self) -> list[Any]:
        """Every source as a full model (loaded lazily, once)."""
        return [self.source_model(i) for i in range(len(self.source_refs))]

    def task_vector(self, index: int, name: str) -> torch.Tensor:
        """Resident float32 task vector of source ``index`` for parameter ``name``."""
        return self._deltas[index][name]


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b) if os.path.exists(a) and os.path.exists(b) else a == b
