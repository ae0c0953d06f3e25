"""Samplers (``SAMPLERS`` registry) and pruners of a search.

Every sampler sees the genome box ``[0, 1]^n`` (:mod:`evomerge_opt.search.codec`):

* ``cmaes``  — Optuna's ``CmaEsSampler`` (the ``cmaes`` package). Its state lives in the trials'
  system attributes, so it survives restarts and is shared by workers.
* ``pycma``  — :class:`PyCmaSampler`, driven by pycma (``cma``) with ask/tell, bounds ``[0, 1]``,
  ``sigma0``, ``popsize`` and IPOP restarts. Its state is persisted in the study (see the class).
* ``tpe``    — Optuna's ``TPESampler`` (multivariate).
* ``random`` — Optuna's ``RandomSampler``.
* ``nsgaii`` — Optuna's ``NSGAIISampler``: the default when the fitness has several objectives (one per
  dataset), giving the Pareto front of recipes.

``build_sampler(spec, names, multi_objective)`` makes one from the space's ``sampler:`` section;
``build_pruner(spec)`` the pruner (``median``, ``wilcoxon``, ``threshold``, ``percentile``, ``none``).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import logging
import pickle
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from evomerge_opt.registry import Registry
from evomerge_opt.search import _optuna_compat as compat

logger = logging.getLogger(__name__)

SamplerFactory = Callable[..., BaseSampler]
SAMPLERS: Registry[SamplerFactory] = Registry("sampler")


def _seed(seed: int | None, offset: int) -> int | None:
    return None if seed is None else (int(seed) + offset) % (2**31 - 1)


@SAMPLERS.register("cmaes")
def _cmaes(spec: Any, names: Sequence[str], seed_offset: int = 0, pruner_name: str = "none") -> BaseSampler:
    seed = _seed(spec.seed, seed_offset)
    kwargs = {"sigma0": spec.sigma0, "popsize": spec.popsize, "seed": seed, "warn_independent_sampling": False,
              "independent_sampler": RandomSampler(seed=seed),
              # A pruned trial is ranked by its last intermediate value: the running perplexity, except
              # under the Wilcoxon pruner (a per-batch loss, another scale): then pruned trials are left out.
              "consider_pruned_trials": pruner_name != "wilcoxon"}
    kwargs.update(spec.options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # consider_pruned_trials
        # `sigma0` is deprecated in Optuna 4.9 (to leave in 6.0) but still honoured; the mean starts at
        # the box's centre (0.5 everywhere), Optuna's default.
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.samplers.CmaEsSampler(**kwargs)


@SAMPLERS.register("pycma")
def _pycma(spec: Any, names: Sequence[str], seed_offset: int = 0, pruner_name: str = "none") -> BaseSampler:
    # The ES itself is deterministic from `spec.seed` (shared by every worker); only the fallback
    # sampler for unexpected parameters uses the worker's offset.
    return PyCmaSampler(names, sigma0=spec.sigma0, popsize=spec.popsize, seed=spec.seed, restarts=spec.restarts,
                        independent_seed=_seed(spec.seed, seed_offset), **spec.options)


@SAMPLERS.register("tpe")
def _tpe(spec: Any, names: Sequence[str], seed_offset: int = 0, pruner_name: str = "none") -> BaseSampler:
    kwargs = {"seed": _seed(spec.seed, seed_offset), "n_startup_trials": spec.n_startup_trials, "multivariate": True}
    kwargs.update(spec.options)
    return optuna.samplers.TPESampler(**kwargs)


@SAMPLERS.register("random")
def _random(spec: Any, names: Sequence[str], seed_offset: int = 0, pruner_name: str = "none") -> BaseSampler:
    return RandomSampler(seed=_seed(spec.seed, seed_offset))


@SAMPLERS.register("nsgaii")
def _nsgaii(spec: Any, names: Sequence[str], seed_offset: int = 0, pruner_name: str = "none") -> BaseSampler:
    kwargs = {"seed": _seed(spec.seed, seed_offset), "population_size": spec.popsize or 20}
    kwargs.update(spec.options)
    return optuna.samplers.NSGAIISampler(**kwargs)


def build_sampler(spec: Any, names: Sequence[str], seed_offset: int = 0, pruner_name: str = "none") -> BaseSampler:
    """The sampler named by ``spec.name`` over the coordinates ``names``.

    ``seed_offset`` separates the random streams of several workers sharing one study (each worker
    passes a different offset; the main ``search`` process uses 0, so a single-process search is
    reproducible from the space's seed).
    """
    return SAMPLERS.get(spec.name)(spec, list(names), seed_offset=seed_offset, pruner_name=pruner_name)


def build_pruner(spec: Any) -> optuna.pruners.BasePruner:
    name = spec.name
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(
            spec.percentile, n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps
        )
    if name == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=spec.p_threshold, n_startup_steps=spec.n_warmup_steps)
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(upper=spec.upper, n_warmup_steps=spec.n_warmup_steps)
    if name == "none":
        return optuna.pruners.NopPruner()
    from evomerge_opt.errors import UnknownNameError

    raise UnknownNameError(f"Unknown pruner {name!r}; valid pruners are: median, percentile, wilcoxon, threshold, none.")


# ---- pycma ---------------------------------------------------------------------------------------------

_PREFIX = "pycma:"
_CHUNK = 2000  # characters per system attribute (kept small so any SQL backend stores it)
_LOCK = threading.Lock()


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """pycma draws from NumPy's global generator: seed it for one call, then restore it."""
    saved = np.random.get_state()
    np.random.seed(seed % (2**32 - 1))
    try:
        yield
    finally:
        np.random.set_state(saved)


def _mix(*parts: int) -> int:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


class PyCmaSampler(BaseSampler):
    """CMA-ES through pycma's ask/tell on the box ``[0, 1]^n``, its state kept in the study.

    **State.** The ES (``cma.CMAEvolutionStrategy``, pickled, zlib, base64, cut into chunks) and its
    current population are stored as *study system attributes* after every tell (``pycma:meta`` and
    ``pycma:es:<i>``). Each trial records ``pycma:restart``, ``pycma:generation`` and ``pycma:slot``
    (its index in the population) as trial system attributes. A restarted study (or another worker)
    reads the stored ES and continues the same evolution: nothing is recomputed from scratch.

    **Generations.** A generation's ``popsize`` solutions are asked once (NumPy seeded from
    ``(seed, restart, generation)``, so every worker asks the same population) and handed out slot by
    slot. When every slot is resolved the ES is told: COMPLETE -> its value, PRUNED -> its last reported
    (running) value, FAIL -> a penalty worse than every finite value of the generation (CMA-ES only
    uses ranks). A slot whose trial is still RUNNING or WAITING (e.g. a retry of a dead worker's trial,
    which keeps the slot attributes) holds the generation open. Trials asked while every slot is taken
    (more workers than ``popsize``) are *extra*: drawn from the current distribution (seeded by the
    trial number) and not told. Enqueued trials with fixed parameters (baselines) are ignored.

    **Restarts (IPOP).** When pycma's stop criteria fire and ``restarts`` remain, a new ES starts from
    a random point (seeded) with the population multiplied by ``incpopsize``.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        sigma0: float = 0.25,
        popsize: int | None = None,
        seed: int | None = 0,
        restarts: int = 0,
        incpopsize: int = 2,
        independent_seed: int | None = None,
        cma_options: dict[str, Any] | None = None,
    ) -> None:
        self.names = list(names)
        self.sigma0 = float(sigma0)
        self.popsize = popsize
        self.seed = 0 if seed is None else int(seed)
        self.restarts = int(restarts)
        self.incpopsize = int(incpopsize)
        self.cma_options = dict(cma_options or {})
        import cma  # noqa: F401  (first import takes seconds: pay it when the sampler is made)

        self._space = {n: FloatDistribution(0.0, 1.0) for n in self.names}
        self._independent = RandomSampler(seed=independent_seed)
        self._cache: tuple[str, dict[str, Any], Any] | None = None

    # ---- Optuna sampler interface ---------------------------------------------------------------------

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space or trial.system_attrs.get("fixed_params") or _PREFIX + "slot" in trial.system_attrs:
            return {}  # an enqueued (baseline) trial, or a retry that keeps its slot and params
        with _LOCK:
            trials = study.get_trials(deepcopy=False)
            meta, es = self._advance(study, None, trials)
            members = self._members(trials, meta, exclude=trial.number)
            taken = {t.system_attrs[_PREFIX + "slot"] for t in members}
            free = [s for s in range(len(meta["population"])) if s not in taken]
            if free:
                slot = free[0]
                x = np.asarray(meta["population"][slot], dtype=float)
            else:
                slot = -1
                with _numpy_seed(_mix(self.seed, meta["restart"], meta["generation"], trial.number)):
                    x = np.asarray(copy.deepcopy(es).ask(1)[0], dtype=float)
            compat.set_trial_system_attr(study, trial, _PREFIX + "restart", meta["restart"])
            compat.set_trial_system_attr(study, trial, _PREFIX + "generation", meta["generation"])
            compat.set_trial_system_attr(study, trial, _PREFIX + "slot", slot)
        return {name: float(min(max(v, 0.0), 1.0)) for name, v in zip(self.names, x)}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        # Tell the ES as soon as the generation's last slot finishes, so the stored state is current.
        if _PREFIX + "slot" not in trial.system_attrs:
            return
        with _LOCK:
            trials = study.get_trials(deepcopy=False)
            self._advance(study, (trial.number, state, values), trials)

    # ---- state -----------------------------------------------------------------------------------

    def _new_es(self, restart: int, popsize: int | None) -> Any:
        import cma

        rng = np.random.default_rng(_mix(self.seed, restart, 0))
        x0 = [0.5] * len(self.names) if restart == 0 else list(rng.uniform(0.2, 0.8, len(self.names)))
        options: dict[str, Any] = {"bounds": [0.0, 1.0], "seed": _mix(self.seed, restart) + 1, "verbose": -9}
        if popsize:
            options["popsize"] = int(popsize)
        options.update(self.cma_options)
        with _numpy_seed(_mix(self.seed, restart, -1)):
            return cma.CMAEvolutionStrategy(x0, self.sigma0, options)

    def _ask_population(self, es: Any, restart: int, generation: int) -> list[list[float]]:
        with _numpy_seed(_mix(self.seed, restart, generation, -2)):
            return [list(map(float, x)) for x in es.ask()]

    def load_state(self, study: Study) -> tuple[dict[str, Any], Any] | None:
        """``(meta, es)`` as stored in ``study`` (None before the first ask). ``meta``: restart,
        generation, population, popsize."""
        attrs = compat.study_system_attrs(study)
        meta = attrs.get(_PREFIX + "meta")
        if meta is None:
            return None
        if self._cache is not None and self._cache[0] == meta["digest"]:
            return self._cache[1], self._cache[2]
        text = "".join(attrs.get(f"{_PREFIX}es:{i}", "") for i in range(meta["chunks"]))
        if hashlib.sha256(text.encode()).hexdigest() != meta["digest"]:
            # Another worker is writing a newer state right now; read again.
            attrs = compat.study_system_attrs(study)
            meta = attrs[_PREFIX + "meta"]
            text = "".join(attrs.get(f"{_PREFIX}es:{i}", "") for i in range(meta["chunks"]))
        es = pickle.loads(zlib.decompress(base64.b64decode(text)))  # our own state, written by this class
        self._cache = (meta["digest"], meta, es)
        return meta, es

    def _save_state(self, study: Study, meta: dict[str, Any], es: Any) -> None:
        text = base64.b64encode(zlib.compress(pickle.dumps(es))).decode()
        chunks = [text[i : i + _CHUNK] for i in range(0, len(text), _CHUNK)]
        meta = dict(meta, chunks=len(chunks), digest=hashlib.sha256(text.encode()).hexdigest())
        for i, chunk in enumerate(chunks):
            compat.set_study_system_attr(study, f"{_PREFIX}es:{i}", chunk)
        compat.set_study_system_attr(study, _PREFIX + "meta", meta)  # last: readers see whole states
        self._cache = (meta["digest"], meta, es)

    @staticmethod
    def _members(trials: list[FrozenTrial], meta: dict[str, Any], exclude: int | None = None) -> list[FrozenTrial]:
        out = []
        for t in trials:
            attrs = t.system_attrs
            if (
                t.number != exclude
                and attrs.get(_PREFIX + "restart") == meta["restart"]
                and attrs.get(_PREFIX + "generation") == meta["generation"]
                and attrs.get(_PREFIX + "slot", -1) >= 0
            ):
                out.append(t)
        return out

    def _advance(
        self, study: Study, finishing: tuple[int, TrialState, Sequence[float] | None] | None,
        trials: list[FrozenTrial],
    ) -> tuple[dict[str, Any], Any]:
        """Load the state, tell every complete generation, ask the next population; persist on change."""
        loaded = self.load_state(study)
        if loaded is None:
            es = self._new_es(0, self.popsize)
            meta = {"restart": 0, "generation": 0, "population": self._ask_population(es, 0, 0)}
            meta["popsize"] = len(meta["population"])
            self._save_state(study, meta, es)
            return self._cache[1], es  # type: ignore[index]
        meta, es = loaded
        es = copy.deepcopy(es)
        changed = False
        while True:
            values = self._generation_values(trials, meta, finishing)
            if values is None:
                break
            es.tell([np.asarray(x, dtype=float) for x in meta["population"]], values)
            restart, generation = meta["restart"], meta["generation"] + 1
            stop = {k: v for k, v in es.stop().items() if k not in ("callback",)}
            if stop and restart < self.restarts:
                restart, generation = restart + 1, 0
                popsize = int(meta["popsize"] * self.incpopsize)
                logger.info("pycma: stop criteria %s met; IPOP restart %d with popsize %d", sorted(stop), restart, popsize)
                es = self._new_es(restart, popsize)
            meta = {"restart": restart, "generation": generation,
                    "population": self._ask_population(es, restart, generation)}
            meta["popsize"] = len(meta["population"])
            changed = True
        if changed:
            self._save_state(study, meta, es)
            meta = self._cache[1]  # type: ignore[index]
        return meta, es

    def _generation_values(
        self, trials: list[FrozenTrial], meta: dict[str, Any],
        finishing: tuple[int, TrialState, Sequence[float] | None] | None,
    ) -> list[float] | None:
        """One value per slot of the current generation, or None while a slot is unresolved."""
        by_slot: dict[int, list[tuple[TrialState, float | None]]] = {}
        for t in self._members(trials, meta):
            state, value = t.state, (t.values[0] if t.values else None)
            if finishing is not None and t.number == finishing[0]:
                state = finishing[1]
                value = finishing[2][0] if finishing[2] else None
            if state == TrialState.PRUNED:
                value = t.user_attrs.get("perplexity_at_prune")
                if value is None and t.intermediate_values:
                    value = t.intermediate_values[max(t.intermediate_values)]
            by_slot.setdefault(t.system_attrs[_PREFIX + "slot"], []).append((state, value))
        values: list[float | None] = []
        for slot in range(meta["popsize"]):
            entries = by_slot.get(slot, [])
            done = [v for s, v in entries if s in (TrialState.COMPLETE, TrialState.PRUNED) and v is not None
                    and np.isfinite(v)]
            if done:
                values.append(float(done[0]))
            elif not entries or any(s in (TrialState.RUNNING, TrialState.WAITING) for s, _ in entries):
                return None
            else:
                values.append(None)  # failed: penalised below
        finite = [v for v in values if v is not None]
        penalty = (max(finite) + abs(max(finite)) + 1.0) if finite else 1e12
        return [penalty if v is None else v for v in values]


__all__ = ["SAMPLERS", "PyCmaSampler", "build_pruner", "build_sampler"]
