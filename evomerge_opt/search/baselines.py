"""The untuned baselines, enqueued as a study's first trials so it shows what evolution gained.

* ``source:<name>`` — every pool model the search uses, alone (``_pretrained_`` included). Its recipe is a
  one-model ``linear`` PS recipe (``apply`` reproduces the model itself); the trial evaluates the loaded
  model directly.
* ``ties_0.5`` / ``dare_ties_0.5`` — uniform TIES and DARE-TIES over the PS sources: weight 1 each,
  density 0.5, lambda 1 (spaces with a PS part and a ``_pretrained_`` base only).

Each baseline is enqueued with the user attributes ``baseline`` (its name) and ``recipe`` (the exact
recipe evaluated) and with the genome closest to it as fixed parameters, so the samplers see a sensible
point. :func:`enqueue_baselines` enqueues only the baselines the study does not hold yet: running it
again after a restart adds nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import optuna

from evomerge_opt.config.space import PRETRAINED, PS_SOURCE, SearchSpace
from evomerge_opt.search.codec import SearchCodec

logger = logging.getLogger(__name__)

SOURCE_PREFIX = "source:"


@dataclass
class Baseline:
    name: str
    recipe: dict[str, Any]
    genome: dict[str, float]

    @property
    def source(self) -> str | None:
        """Pool name of a ``source:<name>`` baseline (evaluated as the loaded model itself)."""
        return self.name[len(SOURCE_PREFIX):] if self.name.startswith(SOURCE_PREFIX) else None


def _source_models(space: SearchSpace) -> list[str]:
    names: list[str] = []
    if space.has_ps and PRETRAINED in space.pool.models:
        names.append(PRETRAINED)
    names.extend(space.ps_sources())
    if space.dfs is not None:
        names.extend(n for n in space.dfs.sources if n != PS_SOURCE)
    return list(dict.fromkeys(names))


def _dtype(space: SearchSpace) -> str | None:
    if space.ps is not None and space.ps.dtype:
        return space.ps.dtype
    return space.pool.dtype


def _genome_values(space: SearchSpace, codec: SearchCodec, *, weights: dict[str, float], density: float,
                   method: str | None, route: str | None) -> dict[str, Any]:
    """Coordinate values nearest a baseline: PS weights/density/method; DFS: all layers of ``route`` at r=0."""
    values: dict[str, Any] = {}
    names = set(codec.names)
    if "ps.method" in names and method in codec.coordinate("ps.method").choices:
        values["ps.method"] = method
    for name in names:
        parts = name.split(".")
        if parts[0] == "ps" and parts[1] in ("weight", "density"):
            values[name] = weights.get(parts[2], 0.0) if parts[1] == "weight" else density
        elif name == "ps.lambda":
            values[name] = 1.0
    if space.dfs is not None:
        for r, m, l in codec.slots():
            source = space.dfs.sources[m]
            values[codec.slot_name("mask", r, source, l)] = r == 0 and source == route
            scale = codec.slot_name("scale", r, source, l)
            if scale in names:
                values[scale] = 1.0
            bias = codec.slot_name("bias", r, source, l)
            if bias in names:
                values[bias] = 0.0
    return values


def make_baselines(space: SearchSpace, codec: SearchCodec) -> list[Baseline]:
    """The baselines of ``space`` in enqueue order: sources alone, then uniform TIES and DARE-TIES."""
    out: list[Baseline] = []
    dtype = _dtype(space)
    dfs_sources = space.dfs.sources if space.dfs is not None else []
    for name in _source_models(space):
        recipe: dict[str, Any] = {"merge_method": "linear",
                                  "models": [{"model": space.pool.models[name], "parameters": {"weight": 1.0}}]}
        if dtype:
            recipe["dtype"] = dtype
        route = name if name in dfs_sources else (PS_SOURCE if PS_SOURCE in dfs_sources else None)
        values = _genome_values(space, codec, weights={name: 1.0}, density=1.0, method="task_arithmetic", route=route)
        out.append(Baseline(SOURCE_PREFIX + name, recipe, codec.encode(values)))
    if space.has_ps and PRETRAINED in space.pool.models:
        assert space.ps is not None
        sources = space.ps_sources()
        for method in ("ties", "dare_ties"):
            recipe = {
                "merge_method": method,
                "base_model": space.pool.models[PRETRAINED],
                "models": [{"model": space.pool.models[s], "parameters": {"weight": 1.0, "density": 0.5}}
                           for s in sources],
                "parameters": {"lambda": 1.0},
            }
            if dtype:
                recipe["dtype"] = dtype
            recipe["seed"] = space.ps.seed
            values = _genome_values(space, codec, weights={s: 1.0 for s in sources}, density=0.5, method=method,
                                    route=PS_SOURCE if PS_SOURCE in dfs_sources else None)
            out.append(Baseline(f"{method}_0.5", recipe, codec.encode(values)))
    return out


def enqueue_baselines(study: optuna.Study, space: SearchSpace, codec: SearchCodec) -> list[str]:
    """Enqueue the baselines ``study`` does not hold yet (by name); returns the names enqueued."""
    present = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)}
    added = []
    for baseline in make_baselines(space, codec):
        if baseline.name in present:
            continue
        study.enqueue_trial(baseline.genome, user_attrs={"baseline": baseline.name, "recipe": baseline.recipe})
        added.append(baseline.name)
    if added:
        logger.info("enqueued %d baseline trial(s): %s", len(added), ", ".join(added))
    return added
