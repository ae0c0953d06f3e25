"""The trial loop end to end on the tiny models: baselines, budget and resume, failures, pruning,
the best-recipe file, and the `search` / `worker` commands."""

from __future__ import annotations

import math

import optuna
import pytest
from _search_helpers import tiny_space, write_data
from optuna.trial import TrialState

from evomerge_opt.cli.main import main
from evomerge_opt.config.yamlio import load_yaml, save_yaml
from evomerge_opt.errors import NonFiniteResultError
from evomerge_opt.search.candidates import CandidateBuilder
from evomerge_opt.search.objective import failure_reason
from evomerge_opt.search.runner import SearchRunner

BASELINES = ["source:_pretrained_", "source:a", "source:b", "ties_0.5", "dare_ties_0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("run_data") / "d.jsonl", rows=24)


def _runner(space, tmp_path, trials, study="s", storage=None, **kwargs):
    storage = storage or f"sqlite:///{tmp_path / 'study.db'}"
    runner = SearchRunner(space, study_name=study, storage=storage, trials=trials, progress=False,
                          recipes_dir=tmp_path / "recipes", **kwargs)
    return runner


def test_baselines_first_tagged_once_and_budget_exact_on_resume(tiny_llama_family, data, tmp_path):
    space = tiny_space(tiny_llama_family, data, baselines=True)
    study = _runner(space, tmp_path, trials=6).run()
    trials = study.get_trials()
    assert [t.user_attrs.get("baseline") for t in trials] == BASELINES + [None]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    alone = trials[1].user_attrs["recipe"]
    assert alone["merge_method"] == "linear" and alone["models"] == [
        {"model": str(tiny_llama_family["ft0"]), "parameters": {"weight": 1.0}}]
    assert trials[3].user_attrs["recipe"]["models"][0]["parameters"] == {"weight": 1.0, "density": 0.5}
    # the "source alone" baselines are the models themselves: three different fitness values
    assert len({round(t.value, 6) for t in trials[:3]}) == 3

    # the same command again with a larger total: baselines are not enqueued again, 8 trials in all
    study = _runner(space, tmp_path, trials=8).run()
    trials = study.get_trials()
    assert len(trials) == 8
    names = [t.user_attrs.get("baseline") for t in trials]
    assert names[:5] == BASELINES and names[5:] == [None, None, None]
    # and with the same total, nothing more runs
    assert len(_runner(space, tmp_path, trials=8).run().get_trials()) == 8
    assert study.user_attrs["kind"] == "ps" and study.user_attrs["objectives"] == ["perplexity"]
    assert study.user_attrs["space"]["pool"]["models"]["a"] == str(tiny_llama_family["ft0"])


def test_resume_with_another_space_is_refused(tiny_llama_family, data, tmp_path):
    space = tiny_space(tiny_llama_family, data)
    _runner(space, tmp_path, trials=1).run()
    other = tiny_space(tiny_llama_family, data, ps={"methods": ["ties"]})
    from evomerge_opt.errors import ConfigError

    with pytest.raises(ConfigError, match="different search space"):
        _runner(other, tmp_path, trials=2).setup()


def test_non_finite_merge_is_a_failed_trial_and_the_study_goes_on(tiny_llama_family, data, tmp_path):
    # weights ~1e38 overflow float32: the resident merge refuses the NaN/inf tensors
    space = tiny_space(tiny_llama_family, data, ps={"methods": ["task_arithmetic"], "weight": {"low": 1e37, "high": 3e38},
                                                   "lambda": 1e10})
    study = _runner(space, tmp_path, trials=3).run()
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.FAIL for t in trials)
    for t in trials:
        assert "NonFiniteResultError" in t.user_attrs["fail_reason"]
        assert t.user_attrs["recipe"]["merge_method"] == "task_arithmetic"  # stored for inspection


def test_builder_errors_fail_the_trial_not_the_study(tiny_llama_family, data, tmp_path, monkeypatch):
    original = CandidateBuilder.build
    calls = {"n": 0}

    def flaky(self, recipe, baseline=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("The size of tensor a (32) must match the size of tensor b (16)")
        if calls["n"] == 3:
            raise NonFiniteResultError("merge produced NaN")
        return original(self, recipe, baseline)

    monkeypatch.setattr(CandidateBuilder, "build", flaky)
    study = _runner(tiny_space(tiny_llama_family, data), tmp_path, trials=4).run()
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    reasons = [t.user_attrs.get("fail_reason") for t in study.get_trials()]
    assert reasons[1].startswith("shape error") and reasons[2].startswith("NonFiniteResultError")


def test_unexpected_errors_are_bugs_and_propagate(tiny_llama_family, data, tmp_path, monkeypatch):
    def broken(self, recipe, baseline=None):
        raise RuntimeError("boom")

    assert failure_reason(RuntimeError("boom")) is None
    assert failure_reason(MemoryError()).startswith("out of memory")
    monkeypatch.setattr(CandidateBuilder, "build", broken)
    runner = _runner(tiny_space(tiny_llama_family, data), tmp_path, trials=2)
    with pytest.raises(RuntimeError, match="boom"):
        runner.run()
    (trial,) = runner.study.get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "unexpected RuntimeError: boom" and "recipe" in trial.user_attrs


def test_empty_dfs_path_is_a_failed_trial(tiny_llama_family, data, tmp_path):
    space = tiny_space(tiny_llama_family, data, kind="dfs", dfs={"mask_threshold": 0.97})
    study = _runner(space, tmp_path, trials=4).run()
    trials = study.get_trials()
    assert len(trials) == 4
    empty = [t for t in trials if t.state == TrialState.FAIL]
    assert empty and all(t.user_attrs["fail_reason"].startswith("empty path") for t in empty)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert any(on for block in t.user_attrs["recipe"]["layer_mask"] for row in block for on in row)


def test_threshold_pruner_stops_hopeless_candidates(tiny_llama_family, data, tmp_path):
    space = tiny_space(tiny_llama_family, data, baselines=True,
                       pruner={"name": "threshold", "upper": 1.0, "n_warmup_steps": 0})
    study = _runner(space, tmp_path, trials=7).run()
    trials = study.get_trials()
    full = trials[0].user_attrs["tokens"]
    assert all(t.state == TrialState.COMPLETE for t in trials[:5])  # baselines are never pruned
    for t in trials[5:]:
        assert t.state == TrialState.PRUNED
        assert 0 < t.user_attrs["tokens"] < full  # stopped after the first batch
        assert t.user_attrs["perplexity_at_prune"] > 1.0
        assert list(t.intermediate_values) == [0]


def test_wilcoxon_reports_per_batch_losses(tiny_llama_family, data, tmp_path):
    space = tiny_space(tiny_llama_family, data, pruner={"name": "wilcoxon", "n_warmup_steps": 1})
    study = _runner(space, tmp_path, trials=2).run()
    for t in study.get_trials():
        losses = list(t.intermediate_values.values())
        assert len(losses) == 3  # 24 rows / batch 8
        if t.state == TrialState.COMPLETE:
            # per-batch losses (not the running perplexity): their exp brackets the trial's perplexity
            assert math.exp(min(losses)) <= t.value * (1 + 1e-6)
            assert t.value <= math.exp(max(losses)) * (1 + 1e-6)
            assert all(loss < 20 for loss in losses)


def test_best_recipe_file_is_written_atomically_with_provenance(tiny_llama_family, data, tmp_path):
    study = _runner(tiny_space(tiny_llama_family, data, baselines=True), tmp_path, trials=6, study="best").run()
    path = tmp_path / "recipes" / "best_best.yaml"
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["best_best.yaml"]  # no temp files left
    recipe = load_yaml(path)
    best = min((t for t in study.get_trials() if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    prov = recipe["provenance"]
    assert prov["study"] == "best" and prov["trial"] == best.number
    assert prov["fitness"]["perplexity"] == pytest.approx(best.value)
    assert prov["fitness"]["per_dataset"] == pytest.approx(best.user_attrs["per_dataset"])
    assert prov["evomerge_version"] and prov["date"].endswith("+00:00")
    assert {k: v for k, v in recipe.items() if k != "provenance"} == best.user_attrs["recipe"]
    from evomerge_opt.config.recipe import load_recipe

    assert load_recipe(path).provenance["trial"] == best.number


def test_best_recipe_applies_and_reproduces_the_fitness(tiny_llama_family, data, tmp_path):
    pytest.importorskip("evomerge_opt.cli.apply", reason="`evo-merge apply` is not built yet")
    space = tiny_space(tiny_llama_family, data, ps={"methods": ["ties"]})
    study = _runner(space, tmp_path, trials=2, study="app").run()
    path = tmp_path / "recipes" / "best_app.yaml"
    out = tmp_path / "merged"
    assert main(["apply", str(path), "--out", str(out)]) == 0
    from evomerge_opt.data.windows import load_windows
    from evomerge_opt.fitness.perplexity import PerplexityEvaluator
    from evomerge_opt.pool import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama_family["base"]))
    evaluator = PerplexityEvaluator([("d0", load_windows({"path": str(data), "seq_len": 16}, tokenizer), 1.0)],
                                    batch_size=8)
    value = evaluator.evaluate(load_causal_lm(str(out))).perplexity
    best = min(t.value for t in study.get_trials() if t.state == TrialState.COMPLETE)
    assert value == pytest.approx(best, rel=1e-4)


def test_cli_search_resume_and_worker(tiny_llama_family, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space_file = tmp_path / "tiny.yaml"
    save_yaml(tiny_space(tiny_llama_family, data), space_file)
    assert main(["search", "--space", str(space_file), "--trials", "2", "--no-progress"]) == 0
    url = "sqlite:///studies/tiny.db"
    assert (tmp_path / "studies" / "tiny.db").is_file() and (tmp_path / "recipes" / "best_tiny.yaml").is_file()
    assert main(["search", "--space", str(space_file), "--trials", "3", "--sampler", "tpe", "--no-progress"]) == 0
    study = optuna.load_study(study_name="tiny", storage=url)
    assert len(study.get_trials()) == 3
    # raise the budget without running, then a worker joins and finishes it from the study's own space
    SearchRunner(str(space_file), study_name="tiny", storage=url, trials=5, progress=False).setup()
    assert main(["worker", "--study", "tiny", "--storage", url, "--no-progress"]) == 0
    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    # a worker on a finished study does nothing
    assert main(["worker", "--study", "tiny", "--storage", url, "--no-progress"]) == 0
    assert len(optuna.load_study(study_name="tiny", storage=url).get_trials()) == 5
    # a bad space is refused before anything heavy runs
    bad = tmp_path / "bad.yaml"
    save_yaml({"kind": "ps"}, bad)
    assert main(["search", "--space", str(bad)]) == 2


def test_budget_is_exact_when_workers_race_for_the_last_slot():
    """Two workers that both saw one free slot each enqueued a token: the one ranked beyond the budget
    gives its token back (marked surplus) and stops; the study ends with exactly the budget."""
    from evomerge_opt.search.budget import (
        BUDGET_ATTR,
        SURPLUS_ATTR,
        TOKEN_ATTR,
        BudgetedStudy,
        BudgetExhausted,
        budget_counts,
    )

    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="race", storage=storage)
    study = BudgetedStudy(study_name="race", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    storage.set_study_system_attr(study._study_id, BUDGET_ATTR, 3)
    for _ in range(2):
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    for _ in range(2):  # both workers enqueued a token for the last slot
        study.add_trial(optuna.create_trial(state=TrialState.WAITING, system_attrs={TOKEN_ATTR: True}))
    late = study.get_trials(states=(TrialState.WAITING,))[1]
    # worker B claimed the later token first: its rank (3 trials numbered below it) is beyond the budget
    assert storage.set_trial_state_values(late._trial_id, TrialState.RUNNING)
    with pytest.raises(BudgetExhausted, match="beyond the budget"):
        study._check_rank(late._trial_id, late.number, True, 3)
    given_back = storage.get_trial(late._trial_id)
    assert given_back.state == TrialState.WAITING and given_back.system_attrs[SURPLUS_ATTR] is True
    # worker A runs the last trial; then nothing is left, and no worker ever creates a trial
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(BudgetExhausted):
        study.ask()
    counts = budget_counts(study.get_trials())
    assert counts == {"started": 3, "waiting": 0, "finished": 3}
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
