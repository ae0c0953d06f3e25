"""Every sampler runs a short study on the tiny models; pycma's ES state survives a restart."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from _search_helpers import tiny_space, write_data
from optuna.trial import TrialState

from evomerge_opt.search.runner import SearchRunner
from evomerge_opt.search.samplers import SAMPLERS, PyCmaSampler, build_pruner


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler_data")
    return [write_data(root / "d0.jsonl", rows=8), write_data(root / "d1.jsonl", rows=6)]


def _run(space, trials, storage=None, study="s", **kwargs):
    storage = storage or optuna.storages.InMemoryStorage()
    runner = SearchRunner(space, study_name=study, storage=storage, trials=trials, progress=False,
                          recipes_dir=kwargs.pop("recipes_dir", None) or "recipes_unused", **kwargs)
    runner.setup()
    return runner, runner.run()


def test_registry_names():
    assert set(SAMPLERS.names()) == {"cmaes", "pycma", "tpe", "random", "nsgaii"}


@pytest.mark.parametrize("name", ["cmaes", "pycma", "tpe", "random"])
def test_sampler_runs_a_short_study(name, tiny_llama_family, data_files, tmp_path):
    space = tiny_space(tiny_llama_family, data_files[0], sampler={"name": name, "popsize": 4})
    _, study = _run(space, trials=5, recipes_dir=tmp_path / "recipes")
    trials = study.get_trials()
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    genomes = [tuple(t.user_attrs["genome"]) for t in trials]
    assert len(set(genomes)) == 5, "every trial must be a new candidate"
    for t in trials:
        assert all(0.0 <= g <= 1.0 for g in t.user_attrs["genome"])
        assert t.user_attrs["recipe"]["merge_method"] in ("ties", "task_arithmetic")
        assert np.isfinite(t.value) and t.value > 1.0
        assert t.user_attrs["per_dataset"]["d0"] == pytest.approx(t.value)
    # The space's sampler drove the study: the CMA-ES variants leave their generation bookkeeping on
    # every trial they sample (the random/TPE streams are checked below, without models).
    marker = {"cmaes": "cma:generation", "pycma": "pycma:generation"}.get(name)
    if marker is not None:
        assert sum(marker in t.system_attrs for t in trials) >= 3
    else:
        assert not any(k.startswith(("cma:", "pycma:")) for t in trials for k in t.system_attrs)
    assert (tmp_path / "recipes" / "best_s.yaml").is_file()


def _spec(name, **kw):
    from evomerge_opt.config.space import SamplerSpec

    return SamplerSpec(name=name, **kw)


def _sphere_study(name, seed, trials, storage=None, study_name="sphere", load=False, **kw):
    """A study of the sampler ``build_sampler`` makes for ``name`` on (x-0.2)^2 + (y-0.7)^2 over [0,1]^2."""
    from evomerge_opt.search.samplers import build_sampler

    sampler = build_sampler(_spec(name, seed=seed, **kw), ["x", "y"])
    if load:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    else:
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.2) ** 2 + (t.suggest_float("y", 0, 1) - 0.7) ** 2,
                   n_trials=trials)
    return study


def _xs(study):
    return [(t.params["x"], t.params["y"]) for t in study.trials]


@pytest.mark.parametrize("name", ["cmaes", "pycma", "tpe", "random"])
def test_sampler_streams_are_reproducible_from_the_seed(name):
    first, again, other = (_sphere_study(name, seed, 12, popsize=4) for seed in (1, 1, 2))
    assert _xs(first) == _xs(again)
    assert _xs(first) != _xs(other)
    assert all(0.0 <= v <= 1.0 for xy in _xs(first) for v in xy)


def test_random_sampler_is_uniform_on_the_unit_cube():
    from scipy import stats

    xs = np.array(_xs(_sphere_study("random", 0, 300)))
    for column in xs.T:  # every coordinate is U(0, 1): a KS test at 1% (seeded, so it cannot flake)
        assert stats.kstest(column, "uniform").pvalue > 0.01


def test_tpe_and_cmaes_concentrate_where_random_does_not():
    """After their start-up trials, TPE and CMA-ES sample closer to the optimum (0.2, 0.7) than random
    search over the same number of trials (seeded: a fixed, not a statistical, comparison)."""
    def late_distance(study):
        xs = np.array(_xs(study))[-20:]
        return float(np.median(np.hypot(xs[:, 0] - 0.2, xs[:, 1] - 0.7)))

    random = late_distance(_sphere_study("random", 0, 60))
    assert late_distance(_sphere_study("tpe", 0, 60, n_startup_trials=10)) < 0.5 * random
    assert late_distance(_sphere_study("cmaes", 0, 60, popsize=6)) < 0.5 * random


def test_cmaes_state_survives_a_restart(tmp_path):
    """Optuna's CMA-ES keeps its optimizer in the trials' system attrs: a new process (new sampler,
    reloaded study) continues the generation count instead of starting over at generation 0."""
    url = f"sqlite:///{tmp_path / 'cmaes.db'}"
    study = _sphere_study("cmaes", 0, 12, storage=url, popsize=4)
    generations = [t.system_attrs.get("cma:generation") for t in study.trials]
    # trial 0 is sampled independently (no search space yet), then generations of popsize 4
    assert generations == [None, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    resumed = _sphere_study("cmaes", 0, 4, storage=url, load=True, popsize=4)
    # the restarted process fills generation 2's last slot, then tells it and moves on to generation 3
    assert [t.system_attrs.get("cma:generation") for t in resumed.trials[12:]] == [2, 3, 3, 3]


def test_nsgaii_with_two_datasets_is_multi_objective(tiny_llama_family, data_files, tmp_path):
    space = tiny_space(tiny_llama_family, data_files, sampler={"name": "nsgaii", "popsize": 2},
                       fitness={"multi_objective": True})
    _, study = _run(space, trials=4, recipes_dir=tmp_path / "recipes")
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    assert len(study.directions) == 2
    assert study.user_attrs["objectives"] == ["d0", "d1"]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    for t in complete:
        assert t.values == pytest.approx([t.user_attrs["per_dataset"]["d0"], t.user_attrs["per_dataset"]["d1"]])
    assert 1 <= len(study.best_trials) <= 4  # the Pareto front


def test_pycma_state_survives_a_restart(tiny_llama_family, data_files, tmp_path):
    url = f"sqlite:///{tmp_path / 'cma.db'}"
    space = tiny_space(tiny_llama_family, data_files[0], sampler={"name": "pycma", "popsize": 2, "seed": 3})
    runner, study = _run(space, trials=5, storage=url, recipes_dir=tmp_path / "r")
    sampler = study.sampler
    assert isinstance(sampler, PyCmaSampler)
    meta, es = sampler.load_state(study)
    # 5 trials with popsize 2: generations 0 and 1 were told, generation 2 holds one trial
    assert meta["generation"] == 2 and es.countiter == 2
    slots = [(t.system_attrs["pycma:generation"], t.system_attrs["pycma:slot"]) for t in study.get_trials()]
    assert slots == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    mean, sigma = np.array(es.mean), float(es.sigma)
    # told exactly the solutions of generation 0: they are the stored trials' params
    del runner, study

    fresh = PyCmaSampler(["x"])  # any new process: state comes from the storage, not the instance
    reopened = optuna.load_study(study_name="s", storage=url)
    meta2, es2 = fresh.load_state(reopened)
    assert np.array_equal(np.array(es2.mean), mean) and float(es2.sigma) == sigma
    assert meta2["population"] == meta["population"]

    # the restarted search continues the same evolution: generation 2 gets its second slot, then tells
    runner2, study2 = _run(space, trials=6, storage=url, recipes_dir=tmp_path / "r")
    assert len(study2.get_trials()) == 6
    last = study2.get_trials()[-1]
    assert (last.system_attrs["pycma:generation"], last.system_attrs["pycma:slot"]) == (2, 1)
    assert last.params == pytest.approx(dict(zip(runner2.codec.names, meta["population"][1])))
    meta3, es3 = study2.sampler.load_state(study2)
    assert meta3["generation"] == 3 and es3.countiter == 3


def test_pycma_penalises_failed_slots_and_ignores_baselines():
    names = ["x", "y"]
    sampler = PyCmaSampler(names, popsize=3, seed=1)
    study = optuna.create_study(sampler=sampler)
    study.enqueue_trial({"x": 0.1, "y": 0.1}, user_attrs={"baseline": "b"})

    def objective(trial):
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
        if trial.number == 2:
            return float("nan")  # a failed candidate
        return (x - 0.3) ** 2 + (y - 0.7) ** 2

    study.optimize(objective, n_trials=7)
    assert "pycma:slot" not in study.trials[0].system_attrs  # the baseline is not part of the ES
    assert study.trials[2].state == TrialState.FAIL
    meta, es = sampler.load_state(study)
    assert meta["generation"] == 2 and es.countiter == 2  # generation 0 was told despite the failure


def test_pycma_ipop_restart_doubles_the_population():
    sampler = PyCmaSampler(["x"], popsize=2, seed=0, restarts=1, sigma0=0.3,
                           cma_options={"tolfun": 1e-1, "tolflatfitness": 1})
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: 1.0 + 0.0 * t.suggest_float("x", 0, 1), n_trials=12)  # flat: stops at once
    meta, _ = sampler.load_state(study)
    assert meta["restart"] == 1 and meta["popsize"] == 4


@pytest.mark.parametrize("name", ["median", "percentile", "wilcoxon", "threshold", "none"])
def test_pruners(name):
    from evomerge_opt.config.space import PrunerSpec

    pruner = build_pruner(PrunerSpec(name=name, upper=10.0))
    assert isinstance(pruner, optuna.pruners.BasePruner)
