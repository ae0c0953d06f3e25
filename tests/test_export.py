"""`evo-merge export`: any trial's recipe as evo-merge YAML (round-trips through load_recipe) or mergekit."""

from __future__ import annotations

import optuna
import pytest
import yaml
from _synthetic_study import fake_models, make_study, ps_recipe

from evomerge_opt.cli.main import main
from evomerge_opt.config.recipe import PSRecipe, load_recipe
from evomerge_opt.errors import ConfigError
from evomerge_opt.search.export import to_mergekit
from evomerge_opt.search.storage import make_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def study_setup(tmp_path):
    url = f"sqlite:///{tmp_path}/e.db"
    models = fake_models(tmp_path / "models")
    study = make_study(make_storage(url, heartbeat_interval=None), models, name="exp")
    return url, models, study


def _export(tmp_path, url, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "out.yaml"
    rc = main(["export", "--study", "exp", "--storage", url, "--out", str(out), *extra])
    return rc, (yaml.safe_load(out.read_text()) if rc == 0 else {})


def test_best_trial_round_trips_through_load_recipe(tmp_path, study_setup):
    url, _, study = study_setup
    rc, data = _export(tmp_path, url, "--best")
    assert rc == 0
    best = study.best_trial
    prov = data.pop("provenance")
    assert data == best.user_attrs["recipe"]
    assert prov["study"] == "exp" and prov["trial"] == best.number
    assert (
        prov["fitness"] == {"perplexity": pytest.approx(best.value)}
        and prov["per_dataset"] == best.user_attrs["per_dataset"]
    )
    assert prov["evomerge_version"] and prov["date"]
    recipe = load_recipe(tmp_path / "out.yaml")  # what `evo-merge apply` would read
    assert recipe.provenance == prov
    if isinstance(recipe, PSRecipe):
        assert recipe.to_dict()["models"] == best.user_attrs["recipe"]["models"]


def test_every_trial_kind_exports_and_loads(tmp_path, study_setup):
    url, _, study = study_setup
    kinds = set()
    for trial in study.get_trials():
        rc, data = _export(tmp_path, url, "--trial", str(trial.number))
        assert rc == 0, trial.number
        recipe = load_recipe(tmp_path / "out.yaml")
        kinds.add(type(recipe).__name__)
        assert data["provenance"]["trial"] == trial.number
        if "baseline" in trial.user_attrs:
            assert data["provenance"]["baseline"] == trial.user_attrs["baseline"]
    assert kinds == {"PSRecipe", "DFSRecipe"}


def test_mergekit_export_of_a_ps_trial(tmp_path, study_setup, capsys):
    url, models, study = study_setup
    ps_trial = next(
        t
        for t in study.get_trials()
        if "baseline" not in t.user_attrs and "merge_method" in t.user_attrs["recipe"]
    )
    rc, data = _export(tmp_path, url, "--trial", str(ps_trial.number), "--format", "mergekit")
    assert rc == 0
    stored = ps_trial.user_attrs["recipe"]
    assert data == {
        "merge_method": "ties",
        "base_model": models["base"],
        "models": [{"model": m["model"], "parameters": m["parameters"]} for m in stored["models"]],
        "parameters": {"normalize": True, "lambda": 1.0},  # sparsify: magnitude is what mergekit's ties does
        "dtype": "float32",
    }
    assert isinstance(
        data["models"][0]["parameters"]["weight"], list
    )  # per-layer values -> mergekit gradient
    assert data["models"][1]["parameters"]["density"][0] == {"filter": "mlp", "value": 0.4}
    text = (tmp_path / "out.yaml").read_text()
    assert text.startswith(
        "# evo-merge mergekit export of study 'exp'"
    ) and "provenance" not in yaml.safe_load(text)


def test_mergekit_drops_evomerge_only_keys_with_warnings(tmp_path):
    models = fake_models(tmp_path)
    recipe = ps_recipe(models, [0.5] * 4, method="dare_linear")
    recipe["parameters"].update({"sparsify": "sparsegpt", "rescale": "l1", "int8_mask": True})
    recipe["resize_policy"] = "truncate_to_base"
    del recipe["models"][0]["parameters"]["weight"]
    config, notes = to_mergekit(recipe)
    assert config["parameters"] == {"normalize": True, "lambda": 1.0, "int8_mask": True}
    assert config["models"][0]["parameters"]["weight"] == 1.0  # mergekit needs an explicit weight
    joined = "\n".join(notes)
    for key in ("sparsify", "rescale", "resize_policy", "seed"):
        assert key in joined
    recipe["parameters"]["rescale"] = "inverse_density"
    assert to_mergekit(recipe)[0]["parameters"]["rescale"] is True
    linear, notes = to_mergekit(
        {
            "merge_method": "linear",
            "models": [{"model": models["ft0"], "parameters": {"weight": 1, "density": 0.5}}],
        }
    )
    assert linear["models"][0]["parameters"] == {"weight": 1} and any("density" in n for n in notes)


def test_mergekit_refuses_dfs_and_bad_trials_are_clear_errors(tmp_path, study_setup, capsys):
    url, _, study = study_setup
    dfs_trial = next(t for t in study.get_trials() if "layer_mask" in (t.user_attrs.get("recipe") or {}))
    rc, _ = _export(tmp_path, url, "--trial", str(dfs_trial.number), "--format", "mergekit")
    assert rc == 2 and "data-flow-space" in capsys.readouterr().err
    rc, _ = _export(tmp_path, url, "--trial", "999")
    assert rc == 2 and "has trials 0.." in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no mergekit equivalent"):
        to_mergekit({"merge_method": "slerp", "models": []})
