"""A synthetic study whose trials carry the study/trial attribute contract (docs/ARCHITECTURE.md, Search).

No model is loaded or merged: the "models" are folders holding only a ``config.json`` (enough for
recipe path checks and for the number of layers a PS gradient spans). Shared by the report, export
and dashboard tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

NUM_LAYERS = 4
PARAMS = ("g0", "g1", "g2", "g3")


def fake_models(root: Path) -> dict[str, str]:
    """base/ft0/ft1 -> folders with a config.json of a 4-layer Llama."""
    out = {}
    for name in ("base", "ft0", "ft1"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(
            json.dumps({"model_type": "llama", "num_hidden_layers": NUM_LAYERS})
        )
        out[name] = str(folder)
    return out


def ps_recipe(models: dict[str, str], genome: list[float], method: str = "ties") -> dict[str, Any]:
    """A PS recipe with a per-layer weight gradient, a filtered density and globals."""
    return {
        "merge_method": method,
        "base_model": models["base"],
        "models": [
            {
                "model": models["ft0"],
                "parameters": {
                    "weight": [round(0.2 + 0.6 * g, 4) for g in genome],
                    "density": 0.3 + 0.6 * genome[0],
                },
            },
            {
                "model": models["ft1"],
                "parameters": {
                    "weight": 0.5,
                    "density": [{"filter": "mlp", "value": 0.4}, {"value": round(0.5 + 0.4 * genome[1], 4)}],
                },
            },
        ],
        "parameters": {"normalize": True, "lambda": 1.0, "sparsify": "magnitude"},
        "dtype": "float32",
        "seed": 0,
    }


def dfs_recipe(models: dict[str, str], genome: list[float]) -> dict[str, Any]:
    """PS+DFS: model 0 is an inline PS recipe, model 1 a plain path; num_r = 2, L = 4."""
    rng = np.random.default_rng(int(genome[0] * 1000))
    mask = (rng.random((2, 2, NUM_LAYERS)) < 0.6).tolist()
    mask[0][0][0] = True  # never an empty path
    scales = np.round(0.8 + 0.4 * rng.random((2, 2, NUM_LAYERS)), 3).tolist()
    return {
        "model_paths": [ps_recipe(models, genome), [models["ft1"], None]],
        "num_r": 2,
        "layer_mask": mask,
        "scaling_factors": scales,
        "bias_factors": None,
        "input_layer_model": 0,
        "output_layer_model": 0,
    }


def make_study(
    storage: Any, models: dict[str, str], name: str = "synthetic", n_regular: int = 8
) -> optuna.Study:
    """3 baselines, ``n_regular`` searched trials (PS for even, PS+DFS for odd numbers), 1 failed, 1 pruned."""
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    study.set_user_attr("space", {"kind": "ps+dfs", "models": list(models.values())})
    study.set_user_attr("kind", "ps+dfs")
    study.set_user_attr("objectives", ["perplexity"])
    study.set_user_attr("evomerge_version", "0.1.0")
    dists = {p: FloatDistribution(0.0, 1.0) for p in PARAMS}
    rng = np.random.default_rng(0)

    def add(
        state: TrialState, value: float | None, attrs: dict[str, Any], genome: list[float], **kw: Any
    ) -> None:
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value,
                params=dict(zip(PARAMS, genome)),
                distributions=dists,
                user_attrs={"genome": genome, **attrs},
                **kw,
            )
        )

    half = [0.5] * len(PARAMS)
    for baseline, method, value in (
        ("source:ft0", "linear", 40.0),
        ("ties_0.5", "ties", 30.0),
        ("dare_ties_0.5", "dare_ties", 32.0),
    ):
        recipe = ps_recipe(models, half, method)
        if method == "linear":
            recipe = {
                "merge_method": "linear",
                "models": [{"model": models["ft0"], "parameters": {"weight": 1.0}}],
            }
        add(
            TrialState.COMPLETE,
            value,
            {"baseline": baseline, "recipe": recipe, "per_dataset": {"d": value}},
            half,
        )
    for i in range(n_regular):
        genome = [round(float(x), 4) for x in rng.random(len(PARAMS))]
        value = 20.0 + 15.0 * genome[0] + 2.0 * genome[1] + float(rng.random())
        recipe = ps_recipe(models, genome) if i % 2 == 0 else dfs_recipe(models, genome)
        attrs = {
            "recipe": recipe,
            "per_dataset": {"d": value},
            "tokens": 512,
            "build_seconds": 0.01,
            "eval_seconds": 0.1,
        }
        add(TrialState.COMPLETE, value, attrs, genome)
    genome = [0.9] * len(PARAMS)
    add(
        TrialState.FAIL,
        None,
        {"recipe": ps_recipe(models, genome), "fail_reason": "NonFiniteResultError: NaN"},
        genome,
    )
    add(
        TrialState.PRUNED,
        None,
        {"recipe": ps_recipe(models, genome)},
        genome,
        intermediate_values={0: 80.0, 1: 75.0},
    )
    return study
