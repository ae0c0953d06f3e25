"""Genome <-> recipe: every searched value is one coordinate ``u`` in ``[0, 1]`` (DESIGN.md section 4).

Decoding (pure functions, no model needed):

* float ``[low, high]``: ``low + u (high - low)``; with ``log: true``: ``exp(log low + u (log high - log low))``;
* mask bit: on when ``u > threshold``;
* categorical over ``n`` choices: ``choices[min(floor(u n), n - 1)]``.

One box ``[0, 1]^n`` keeps CMA-ES's single step size meaningful for every parameter. Coordinates are
named (Optuna parameter names, shown in the dashboard):

* PS: ``ps.method``, ``ps.sparsify`` (only when several are allowed), ``ps.weight.<source>`` and
  ``ps.density.<source>`` (``.<g>`` appended per layer / group when the granularity is not global),
  ``ps.lambda``;
* DFS: ``dfs.mask.r<r>.<source>.l<l>``, ``dfs.scale.r<r>.<source>.l<l>``, ``dfs.bias.r<r>.<source>.l<l>``
  for every slot ``(r, m, l)`` (hop order r, then m, then l; seed 003's layout).

``SearchCodec(space, num_layers).decode(genome)`` gives the recipe as plain data: a PS recipe
(``merge_method``...), a DFS recipe (``model_paths``...) or, for ``ps+dfs``, a DFS recipe whose
``model_paths`` entry for ``ps`` is the inline PS recipe. That is exactly what ``evo-merge apply`` takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge_opt.config.space import PRETRAINED, PS_SOURCE, Groups, Range, SearchSpace
from evomerge_opt.errors import ConfigError


@dataclass(frozen=True)
class Coordinate:
    """One searched value. ``kind``: ``float`` (``low``/``high``/``log``), ``mask`` or ``categorical``."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    threshold: float = 0.5
    choices: tuple[Any, ...] = field(default_factory=tuple)

    def decode(self, u: float) -> Any:
        u = min(max(float(u), 0.0), 1.0)
        if self.kind == "mask":
            return u > self.threshold
        if self.kind == "categorical":
            n = len(self.choices)
            return self.choices[min(math.floor(u * n), n - 1)]
        if self.high == self.low:
            return float(self.low)
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            return float(math.exp(lo + u * (hi - lo)))
        return float(self.low + u * (self.high - self.low))

    def encode(self, value: Any) -> float:
        """The coordinate whose decoding is ``value`` (floats are clipped into ``[low, high]``)."""
        if self.kind == "mask":
            # Midpoints of (threshold, 1] and [0, threshold]: robust to small perturbations.
            return (1.0 + self.threshold) / 2.0 if bool(value) else self.threshold / 2.0
        if self.kind == "categorical":
            if value not in self.choices:
                raise ConfigError(f"{self.name}: {value!r} is not one of the choices {list(self.choices)}.")
            return (self.choices.index(value) + 0.5) / len(self.choices)
        x = min(max(float(value), self.low), self.high)
        if self.high == self.low:
            return 0.5
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            return (math.log(x) - lo) / (hi - lo)
        return (x - self.low) / (self.high - self.low)


def _float_coord(name: str, value: Range) -> Coordinate:
    return Coordinate(name, "float", low=float(value.low), high=float(value.high), log=bool(value.log))


def layer_groups(granularity: Any, num_layers: int) -> list[int]:
    """Group index of every decoder layer: ``global`` -> one group; ``per_layer`` -> L; ``{groups: N}``."""
    if granularity == "global":
        return [0] * num_layers
    if granularity == "per_layer":
        return list(range(num_layers))
    if isinstance(granularity, Groups):
        n = granularity.groups
        if n > num_layers:
            raise ConfigError(
                f"ps.granularity.groups: `groups <= num_hidden_layers` must hold, but got groups={n} for "
                f"{num_layers} layers; use per_layer or fewer groups."
            )
        # Contiguous blocks: layer l belongs to group floor(l * N / L).
        return [l * n // num_layers for l in range(num_layers)]
    raise ConfigError(f"ps.granularity: unknown value {granularity!r}; use global, per_layer or {{groups: N}}.")


class SearchCodec:
    """The genome layout of one search space for models with ``num_layers`` decoder layers."""

    def __init__(self, space: SearchSpace, num_layers: int) -> None:
        if num_layers < 1:
            raise ConfigError(f"`num_layers >= 1` must hold, but got {num_layers}.")
        self.space = space
        self.num_layers = num_layers
        self.coordinates: list[Coordinate] = []
        self.fixed: dict[str, Any] = {}
        if space.has_ps:
            self._add_ps()
        if space.has_dfs:
            self._add_dfs()
        self._by_name = {c.name: c for c in self.coordinates}
        if len(self._by_name) != len(self.coordinates):
            raise ConfigError("Two searched values got the same coordinate name; rename pool models apart.")

    # ---- layout --------------------------------------------------------------------------------

    def _value(self, name: str, value: Any) -> None:
        """A searched (Range) or fixed (number) value."""
        if isinstance(value, Range):
            self.coordinates.append(_float_coord(name, value))
        elif value is not None:
            self.fixed[name] = float(value)

    def _add_ps(self) -> None:
        ps = self.space.ps
        assert ps is not None
        if len(ps.methods) > 1:
            self.coordinates.append(Coordinate("ps.method", "categorical", choices=tuple(ps.methods)))
        if ps.sparsify and len(ps.sparsify) > 1:
            self.coordinates.append(Coordinate("ps.sparsify", "categorical", choices=tuple(ps.sparsify)))
        self.groups = layer_groups(ps.granularity, self.num_layers)
        self.n_groups = max(self.groups) + 1
        for source in self.space.ps_sources():
            for key, value in (("weight", ps.weight), ("density", ps.density)):
                for g in range(self.n_groups):
                    self._value(self._ps_name(key, source, g), value)
        self._value("ps.lambda", ps.lambda_)

    def _ps_name(self, key: str, source: str, group: int) -> str:
        return f"ps.{key}.{source}" if self.n_groups == 1 else f"ps.{key}.{source}.{group}"

    def _add_dfs(self) -> None:
        dfs = self.space.dfs
        assert dfs is not None
        for r, m, l in self.slots():
            source = dfs.sources[m]
            self.coordinates.append(Coordinate(self.slot_name("mask", r, source, l), "mask", threshold=dfs.mask_threshold))
            self._value(self.slot_name("scale", r, source, l), dfs.scaling)
            if dfs.bias is not False:
                self._value(self.slot_name("bias", r, source, l), dfs.bias)

    def slots(self) -> list[tuple[int, int, int]]:
        dfs = self.space.dfs
        if dfs is None:
            return []
        return [(r, m, l) for r in range(dfs.num_r) for m in range(len(dfs.sources)) for l in range(self.num_layers)]

    @staticmethod
    def slot_name(what: str, r: int, source: str, layer: int) -> str:
        return f"dfs.{what}.r{r}.{source}.l{layer}"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.coordinates]

    def __len__(self) -> int:
        return len(self.coordinates)

    def coordinate(self, name: str) -> Coordinate:
        return self._by_name[name]

    # ---- genome <-> values ------------------------------------------------------------------------

    def _as_mapping(self, genome: Mapping[str, float] | Sequence[float]) -> dict[str, float]:
        if isinstance(genome, Mapping):
            missing = [n for n in self.names if n not in genome]
            if missing:
                raise ConfigError(f"The genome lacks coordinates {missing[:5]}{'...' if len(missing) > 5 else ''}.")
            return {n: float(genome[n]) for n in self.names}
        values = list(genome)
        if len(values) != len(self.coordinates):
            raise ConfigError(f"The genome has {len(values)} coordinates, but this space has {len(self.coordinates)}.")
        return dict(zip(self.names, map(float, values)))

    def decode_values(self, genome: Mapping[str, float] | Sequence[float]) -> dict[str, Any]:
        """Coordinate name -> decoded value (plus the fixed values)."""
        mapping = self._as_mapping(genome)
        out = dict(self.fixed)
        out.update({c.name: c.decode(mapping[c.name]) for c in self.coordinates})
        return out

    def encode(self, values: Mapping[str, Any], default: float = 0.5) -> dict[str, float]:
        """A genome whose decoding gives ``values``; coordinates not named there take ``default``."""
        unknown = sorted(set(values) - set(self.names) - set(self.fixed))
        if unknown:
            raise ConfigError(f"Unknown coordinates {unknown[:5]}; this space has {self.names[:5]}...")
        return {c.name: (c.encode(values[c.name]) if c.name in values else default) for c in self.coordinates}

    def center(self) -> dict[str, float]:
        return {n: 0.5 for n in self.names}

    # ---- recipes ---------------------------------------------------------------------------------

    def decode(self, genome: Mapping[str, float] | Sequence[float]) -> dict[str, Any]:
        """The recipe (plain data, what ``apply`` takes) of a genome. Pure: same genome, same recipe."""
        values = self.decode_values(genome)
        ps_recipe = self._ps_recipe(values) if self.space.has_ps else None
        if self.space.kind == "ps":
            return ps_recipe  # type: ignore[return-value]
        return self._dfs_recipe(values, ps_recipe)

    def _per_layer(self, values: dict[str, Any], key: str, source: str) -> float | list[float]:
        if self.n_groups == 1:
            return values[self._ps_name(key, source, 0)]
        return [values[self._ps_name(key, source, g)] for g in self.groups]

    def _ps_recipe(self, values: dict[str, Any]) -> dict[str, Any]:
        ps = self.space.ps
        pool = self.space.pool
        assert ps is not None
        method = values.get("ps.method", ps.methods[0])
        parameters: dict[str, Any] = {}
        if "ps.lambda" in values:
            parameters["lambda"] = values["ps.lambda"]
        if ps.sparsify:
            parameters["sparsify"] = values.get("ps.sparsify", ps.sparsify[0])
        if ps.normalize is not None:
            parameters["normalize"] = ps.normalize
        if ps.rescale is not None:
            parameters["rescale"] = ps.rescale
        recipe: dict[str, Any] = {"merge_method": method}
        if PRETRAINED in pool.models:
            recipe["base_model"] = pool.models[PRETRAINED]
        recipe["models"] = [
            {
                "model": pool.models[source],
                "parameters": {
                    "weight": self._per_layer(values, "weight", source),
                    "density": self._per_layer(values, "density", source),
                },
            }
            for source in self.space.ps_sources()
        ]
        if parameters:
            recipe["parameters"] = parameters
        dtype = ps.dtype or pool.dtype
        if dtype:
            recipe["dtype"] = dtype
        recipe["seed"] = ps.seed
        if pool.tokenizer and pool.tokenizer != pool.models.get(PRETRAINED):
            recipe["tokenizer_source"] = pool.tokenizer
        return recipe

    def _dfs_recipe(self, values: dict[str, Any], ps_recipe: dict[str, Any] | None) -> dict[str, Any]:
        dfs = self.space.dfs
        assert dfs is not None
        sources, L = dfs.sources, self.num_layers
        mask = [[[False] * L for _ in sources] for _ in range(dfs.num_r)]
        scale = [[[1.0] * L for _ in sources] for _ in range(dfs.num_r)]
        bias = [[[0.0] * L for _ in sources] for _ in range(dfs.num_r)] if dfs.bias is not False else None
        for r, m, l in self.slots():
            name = sources[m]
            mask[r][m][l] = bool(values[self.slot_name("mask", r, name, l)])
            scale[r][m][l] = float(values[self.slot_name("scale", r, name, l)])
            if bias is not None:
                bias[r][m][l] = float(values[self.slot_name("bias", r, name, l)])
        model_paths: list[Any] = [
            ps_recipe if name == PS_SOURCE else self.space.pool.models[name] for name in sources
        ]
        recipe: dict[str, Any] = {
            "model_paths": model_paths,
            "num_r": dfs.num_r,
            "layer_mask": mask,
            "scaling_factors": scale,
            "bias_factors": bias,
            "input_layer_model": self.space.dfs_source_index(dfs.input_layer_model),
            "output_layer_model": self.space.dfs_source_index(dfs.output_layer_model),
        }
        dtype = dfs.dtype or self.space.pool.dtype
        if dtype:
            recipe["dtype"] = dtype
        return recipe


def path_length(recipe: Mapping[str, Any]) -> int:
    """Number of hops of a DFS recipe (0 for a PS recipe: not a routed model)."""
    if "layer_mask" not in recipe:
        return 0
    return sum(bool(on) for block in recipe["layer_mask"] for row in block for on in row)
