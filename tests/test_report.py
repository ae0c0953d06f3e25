"""`evo-merge report`: PNG plots of a study built from the trial attribute contract (no models)."""

from __future__ import annotations

import logging

import numpy as np
import optuna
import pytest
from _synthetic_study import NUM_LAYERS, dfs_recipe, fake_models, make_study

from evomerge_opt.cli.main import main
from evomerge_opt.search import report as R
from evomerge_opt.search.storage import make_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG


def test_report_cli_writes_every_plot(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/r.db"
    make_study(make_storage(url, heartbeat_interval=None), fake_models(tmp_path / "models"), name="rep")
    out = tmp_path / "plots"
    assert main(["report", "--study", "rep", "--storage", url, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = {"history.png", "importances.png", "best_ps_profile.png", "best_dfs_path.png"}
    assert {p.rsplit("/", 1)[-1] for p in printed} == names
    for name in names:
        assert _is_png(out / name), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_report_wrong_study_name_lists_the_available_ones(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/r.db"
    make_study(make_storage(url, heartbeat_interval=None), fake_models(tmp_path / "models"), name="present")
    assert main(["report", "--study", "absent", "--storage", url, "--out", str(tmp_path / "o")]) == 2
    assert "Studies there: present" in capsys.readouterr().err


def test_too_few_trials_give_an_explaining_figure_not_a_crash(tmp_path, caplog):
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.5}, user_attrs={"baseline": "ties_0.5"})
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + 1, n_trials=2)
    with caplog.at_level(logging.WARNING, logger="evomerge_opt.search.report"):
        written = R.write_report(study, tmp_path)
    assert [p.name for p in written] == ["history.png", "importances.png"]  # no recipe -> no PS/DFS plot
    assert all(_is_png(p) for p in written)
    assert "need at least" in caplog.text


def test_dfs_path_matrix_follows_hop_order_and_scales():
    recipe = {
        "layer_mask": [[[True, False], [False, True]], [[False, True], [True, False]]],  # num_r=2, M=2, L=2
        "scaling_factors": [[[0.5, 9.0], [9.0, [1.0, 3.0]]], [[9.0, [[2.0, 7.0], [7.0, 4.0]]], [1.5, 9.0]]],
    }
    matrix, hops = R.dfs_path_matrix(recipe)
    assert hops == [(0, 0), (1, 1), (0, 1), (1, 0)]  # r=0: m0 l0, m1 l1; r=1: m0 l1, m1 l0
    expected = np.full((4, 4), np.nan)
    expected[0, 0], expected[3, 1], expected[1, 2], expected[2, 3] = (
        0.5,
        2.0,
        3.0,
        1.5,
    )  # vector mean, diag mean
    np.testing.assert_array_equal(matrix, expected)
    with pytest.raises(ValueError, match="leading shape"):
        R.dfs_path_matrix({**recipe, "scaling_factors": [1.0]})


def test_ps_profile_reads_gradients_and_filters(tmp_path):
    models = fake_models(tmp_path / "m")
    recipe = dfs_recipe(models, [0.0, 1.0, 0.5, 0.25])
    part = R.ps_parts(recipe)
    assert len(part) == 1 and part[0]["merge_method"] == "ties"
    assert R._num_layers(part[0]) == (NUM_LAYERS, True)
    weight = R._profile(part[0]["models"][0]["parameters"]["weight"], NUM_LAYERS)
    assert list(weight) == [""] and weight[""] == pytest.approx([0.2, 0.8, 0.5, 0.35])
    density = R._profile(part[0]["models"][1]["parameters"]["density"], NUM_LAYERS)
    assert density["mlp"] == [0.4] * NUM_LAYERS and density["attention"] == pytest.approx([0.9] * NUM_LAYERS)


def test_multi_objective_study_plots_one_panel_per_objective(tmp_path):
    from optuna.distributions import FloatDistribution

    from evomerge_opt.errors import ConfigError
    from evomerge_opt.search.export import select_trial

    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_user_attr("objectives", ["math", "lang"])
    for i in range(6):
        x = i / 5
        study.add_trial(
            optuna.trial.create_trial(
                values=[10 + x, 12 - x],
                params={"g0": x, "g1": 1 - x * x},
                distributions={"g0": FloatDistribution(0, 1), "g1": FloatDistribution(0, 1)},
                user_attrs={"baseline": "ties_0.5"} if i == 0 else {},
            )
        )
    written = R.write_report(study, tmp_path)
    assert [p.name for p in written] == ["history.png", "importances.png"] and all(
        _is_png(p) for p in written
    )
    with pytest.raises(ConfigError, match="Pareto-optimal trials"):
        select_trial(study)
    assert select_trial(study, 3).number == 3


def test_profiles_show_the_best_searched_trial_not_a_baseline(tmp_path):
    study = make_study(optuna.storages.InMemoryStorage(), fake_models(tmp_path / "m"))
    best_ps = R._best_with(study, lambda r: bool(R.ps_parts(r)))
    searched = [
        t for t in study.get_trials() if t.state.name == "COMPLETE" and "baseline" not in t.user_attrs
    ]
    assert "baseline" not in best_ps.user_attrs
    assert best_ps.value == min(t.value for t in searched)  # every searched trial here has a PS part
    only_baselines = optuna.create_study()
    for t in study.get_trials()[:3]:
        only_baselines.add_trial(t)
    assert R._best_with(only_baselines, lambda r: bool(R.ps_parts(r))).user_attrs["baseline"] == "ties_0.5"
