"""Candidates: a decoded recipe -> a model in memory, from models loaded once per worker.

* PS candidates are written in place into ONE resident model by
  :class:`~evomerge_opt.merge.resident.ResidentMerger` (no disk, no re-instantiation);
* DFS candidates route through the loaded source models' layers by reference
  (:func:`~evomerge_opt.dfs.build.build_dfs_candidate`, microseconds);
* PS+DFS: the PS build first, then DFS over ``[ps_model, sources...]`` in ``dfs.sources`` order;
* a ``source:<name>`` baseline is that pool model itself.
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge_opt.config.space import PRETRAINED, PS_SOURCE, SearchSpace
from evomerge_opt.search.baselines import SOURCE_PREFIX
from evomerge_opt.search.codec import SearchCodec, path_length


class CandidateFailed(Exception):
    """A candidate that cannot be built or scored; ``reason`` goes to ``user_attrs['fail_reason']``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CandidateBuilder:
    """Holds the worker's models (loaded once) and builds candidates from decoded recipes."""

    def __init__(self, space: SearchSpace, codec: SearchCodec, device: str | torch.device = "cpu") -> None:
        self.space = space
        self.codec = codec
        self.device = torch.device(device)
        self.dtype = space.pool.dtype
        self.merger: Any = None
        self._models: dict[str, Any] = {}
        if space.has_ps:
            from evomerge_opt.merge.resident import ResidentMerger

            refs = [space.pool.models[s] for s in space.ps_sources()]
            self.merger = ResidentMerger(space.pool.models[PRETRAINED], refs, device=self.device, dtype=self.dtype)
        if space.dfs is not None:
            for name in space.dfs.sources:
                if name != PS_SOURCE:
                    self.model(name)

    def model(self, name: str) -> Any:
        """Pool model ``name`` as a full model (loaded once; shared with the merger when it has it)."""
        if name not in self._models:
            sources = self.space.ps_sources()
            if self.merger is not None and name in sources:
                self._models[name] = self.merger.source_model(sources.index(name))
            else:
                from evomerge_opt.pool import load_causal_lm

                base = self.space.pool.models.get(PRETRAINED)
                self._models[name] = load_causal_lm(self.space.pool.models[name], dtype=self.dtype,
                                                    device=self.device, base_model=base)
        return self._models[name]

    def release(self, name: str) -> None:
        """Drop a model loaded only for a baseline (not a DFS source, not held by the merger)."""
        keep = set(self.space.dfs.sources) if self.space.dfs is not None else set()
        if name not in keep and name not in self.space.ps_sources():
            self._models.pop(name, None)

    def build(self, recipe: dict[str, Any], baseline: str | None = None) -> Any:
        if baseline is not None and baseline.startswith(SOURCE_PREFIX):
            return self.model(baseline[len(SOURCE_PREFIX):])
        if "merge_method" in recipe:  # a PS recipe (PS search or a PS baseline)
            if self.merger is None:
                raise CandidateFailed("a parameter-space recipe needs a PS search space (no resident merger)")
            return self.merger.build(recipe)
        from evomerge_opt.config.dfs_recipe import load_dfs_recipe
        from evomerge_opt.dfs.build import build_dfs_candidate

        assert self.space.dfs is not None
        if path_length(recipe) == 0:
            raise CandidateFailed("empty path: no DFS slot is above the mask threshold")
        models = []
        for name, entry in zip(self.space.dfs.sources, recipe["model_paths"]):
            models.append(self.merger.build(entry) if name == PS_SOURCE else self.model(name))
        parsed = load_dfs_recipe(recipe)
        return build_dfs_candidate(models, parsed, source_names=list(self.space.dfs.sources))
