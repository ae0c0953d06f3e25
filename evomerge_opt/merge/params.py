"""Turn a :class:`~evomerge_opt.config.recipe.PSRecipe` into per-tensor merge parameters.

``RecipeParams(recipe, num_layers, importance)`` resolves the method, the sparsifier (checking that
``sparsegpt`` has an importance provider), and per tensor the per-layer weights and densities
(:func:`~evomerge_opt.config.recipe.resolve_param`), and merges one tensor with :meth:`merge_tensor`.
The streaming and resident engines both call :meth:`merge_tensor`, so they agree tensor for tensor.
"""

from __future__ import annotations

import math

import torch

from evomerge_opt.config.recipe import PSRecipe, layer_index, resolve_param
from evomerge_opt.errors import ConfigError
from evomerge_opt.merge._base import ImportanceProvider, TensorContext
from evomerge_opt.merge.methods import MergeMethod, TensorInputs, TensorParams, get_method
from evomerge_opt.merge.sparsify import get_sparsifier


class RecipeParams:
    """Everything per-tensor a merge needs from a recipe (sources = ``recipe.models`` in order)."""

    def __init__(
        self, recipe: PSRecipe, num_layers: int, importance: ImportanceProvider | None = None,
        source_indices: list[int] | None = None,
    ) -> None:
        self.recipe = recipe
        self.num_layers = num_layers
        self.importance = importance
        self.method: MergeMethod = get_method(recipe.merge_method)
        # Which recipe.models entries take part (the base listed as a model is dropped for
        # task-vector methods, as in mergekit); ctx.source_index stays the recipe's index.
        self.source_indices = list(range(len(recipe.models))) if source_indices is None else source_indices
        sparsify = recipe.global_param("sparsify", self.method.default_sparsify)
        if sparsify is not None and recipe.merge_method == "linear":
            raise ConfigError("merge_method linear does not trim; remove parameters.sparsify or use ties/dare_*.")
        self.sparsifier = get_sparsifier(sparsify) if sparsify is not None else None
        if sparsify == "sparsegpt" and importance is None:
            raise ConfigError(
                "parameters.sparsify is 'sparsegpt' but no importance provider was given; SparseGPT trimming "
                "needs Hessians of calibration data (pass importance=HessianImportance(...), or use "
                "`evo-merge compare`/the search, which compute them), or use sparsify: magnitude."
            )
        self.rescale = recipe.global_param("rescale", self.method.default_rescale)
        self.normalize = bool(recipe.global_param("normalize", self.method.default_normalize))
        self.lam_value = recipe.global_param("lambda", 1.0)
        self._cache: dict[int, TensorParams] = {}
        self._uses_names = self._has_filters()

    def _has_filters(self) -> bool:
        values = [self.lam_value] + [
            self.recipe.source_param(i, key, 1.0) for i in self.source_indices for key in ("weight", "density")
        ]
        return any(isinstance(v, list) and v and isinstance(v[0], dict) for v in values)

    def tensor_params(self, name: str) -> TensorParams:
        layer = layer_index(name, self.num_layers)
        if not self._uses_names and layer in self._cache:
            return self._cache[layer]
        weights, densities = [], []
        for i in self.source_indices:
            weights.append(float(resolve_param(self.recipe.source_param(i, "weight", 1.0), name, layer, self.num_layers)))
            density = float(resolve_param(self.recipe.source_param(i, "density", 1.0), name, layer, self.num_layers))
            if not 0 < density <= 1 or math.isnan(density):
                raise ConfigError(
                    f"`0 < density <= 1` must hold, but got density={density} for models[{i}] on tensor {name!r}; "
                    "use a value in (0, 1]."
                )
            densities.append(density)
        lam = float(resolve_param(self.lam_value, name, layer, self.num_layers))
        params = TensorParams(weights, densities, self.normalize, lam, self.rescale, self.sparsifier)
        if not self._uses_names:
            self._cache[layer] = params
        return params

    def merge_into(self, name: str, inputs: TensorInputs, out: torch.Tensor) -> torch.Tensor:
        """Merge tensor ``name`` into ``out`` (any float dtype, ``inputs.shape``), check it is finite."""
        params = self.tensor_params(name)
        layer = layer_index(name, self.num_layers)
        ctxs = [
            TensorContext(name=name, source_index=i, seed=self.recipe.seed, layer=layer,
                          num_layers=self.num_layers, importance=self.importance)
            for i in self.source_indices
        ]
        self.method.merge(inputs, params, ctxs, out.view(-1))  # raises NonFiniteResultError on NaN/inf
        return out
