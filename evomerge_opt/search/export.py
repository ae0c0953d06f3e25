"""Turn a stored trial back into a recipe file: evo-merge's own format or a mergekit config (PS only).

The trial's ``user_attrs['recipe']`` is exactly what ``evo-merge apply`` takes; the evo-merge export adds
``provenance`` (study, trial, fitness per dataset, date, version). The mergekit export maps the common
subset (``linear``, ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``; per-source ``weight`` /
``density`` as scalars, gradients or filter lists; ``normalize``, ``lambda``, ``int8_mask``, ``rescale``)
and drops evo-merge-only keys with a warning naming each one.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge_opt._version import __version__
from evomerge_opt.errors import ConfigError, ModelSourceError

logger = logging.getLogger(__name__)

MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
# evo-merge `rescale` -> mergekit's boolean `rescale` (DARE's 1/density); `l1` has no mergekit twin.
_RESCALE_TO_MERGEKIT = {"inverse_density": True, "none": False}
# The sparsifier each mergekit method always uses.
_MERGEKIT_SPARSIFIER = {"ties": "magnitude", "dare_ties": "random", "dare_linear": "random"}


def select_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial:
    """Trial ``number``, or the best completed trial (single objective) when ``number`` is None."""
    trials = study.get_trials(deepcopy=False)
    if number is not None:
        if not 0 <= number < len(trials):
            raise ConfigError(
                f"Study {study.study_name!r} has trials 0..{len(trials) - 1}, but --trial {number} was asked for."
            )
        return trials[number]
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        raise ConfigError(
            f"Study {study.study_name!r} has no completed trial yet; pass --trial N to export another."
        )
    if len(study.directions) > 1:
        front = sorted(t.number for t in study.best_trials)
        raise ConfigError(
            f"Study {study.study_name!r} has {len(study.directions)} objectives, so there is no single best trial; "
            f"pass --trial N with one of the Pareto-optimal trials {front}."
        )
    return study.best_trial


def trial_recipe(trial: FrozenTrial) -> dict[str, Any]:
    """A deep copy of the trial's decoded recipe; a clear error when it has none."""
    recipe = trial.user_attrs.get("recipe")
    if not isinstance(recipe, dict):
        reason = trial.user_attrs.get("fail_reason")
        raise ConfigError(
            f"Trial {trial.number} ({trial.state.name}) carries no recipe"
            + (f" (it failed: {reason})" if reason else "")
            + "; choose another --trial."
        )
    if trial.state != TrialState.COMPLETE:
        logger.warning(
            "Trial %d is %s, not COMPLETE: its recipe is exported all the same.",
            trial.number,
            trial.state.name,
        )
    return copy.deepcopy(recipe)


def provenance(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """Where a recipe came from: study, trial, fitness (aggregate and per dataset), date, versions."""
    when = trial.datetime_complete or trial.datetime_start or datetime.now(timezone.utc)
    out: dict[str, Any] = {"study": study.study_name, "trial": trial.number, "state": trial.state.name}
    names = study.user_attrs.get("objectives") or ["perplexity"]
    if trial.values is not None:
        out["fitness"] = (
            dict(zip(names, [float(v) for v in trial.values]))
            if len(names) == len(trial.values)
            else [float(v) for v in trial.values]
        )
    if "per_dataset" in trial.user_attrs:
        out["per_dataset"] = trial.user_attrs["per_dataset"]
    if "baseline" in trial.user_attrs:
        out["baseline"] = trial.user_attrs["baseline"]
    out["date"] = when.isoformat(timespec="seconds")
    out["evomerge_version"] = __version__
    if study.user_attrs.get("evomerge_version"):
        out["search_evomerge_version"] = study.user_attrs["evomerge_version"]
    return out


def evomerge_recipe(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The trial's recipe with ``provenance``, validated with ``load_recipe`` (a warning if it fails here)."""
    from evomerge_opt.config.recipe import load_recipe

    recipe = trial_recipe(trial)
    recipe["provenance"] = provenance(study, trial)
    try:
        load_recipe(copy.deepcopy(recipe))
    except ConfigError as exc:  # e.g. the models live on another machine: still export what was searched
        problems = "; ".join(getattr(exc, "problems", None) or []) or str(exc)
        logger.warning(
            "Trial %d's recipe does not validate on this machine (%s); it is written as stored. Run "
            "`evo-merge validate` on it where its models are.",
            trial.number,
            problems,
        )
    return recipe


def _mergekit_ref(ref: Any, where: str) -> Any:
    """zoo:NAME -> its folder (mergekit cannot read zoo refs); local paths absolute; hub ids unchanged."""
    from evomerge_opt.io.sources import resolve_model_ref

    if not isinstance(ref, str):
        return ref
    try:
        return resolve_model_ref(ref)
    except ModelSourceError as exc:
        logger.warning("%s: %s Written unchanged.", where, exc)
        return ref


def to_mergekit(recipe: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(mergekit config, warnings) for a PS recipe; a DFS recipe is a ConfigError."""
    from evomerge_opt.config.recipe import recipe_kind

    kind = recipe_kind(recipe)
    if kind == "dfs":
        raise ConfigError(
            "This trial's recipe is a data-flow-space (layer routing) merge; mergekit has no such merge. "
            "Export it with --format evomerge and build it with `evo-merge apply`."
        )
    if kind != "ps":
        raise ConfigError(
            "The trial's recipe is not a parameter-space recipe (no `merge_method`); cannot export it."
        )
    method = recipe["merge_method"]
    if method not in MERGEKIT_METHODS:
        raise ConfigError(
            f"merge_method {method!r} has no mergekit equivalent; mergekit export supports "
            f"{', '.join(MERGEKIT_METHODS)}."
        )
    notes: list[str] = []
    glob = dict(recipe.get("parameters") or {})
    has_base = method != "linear"
    takes_density = method in ("ties", "dare_ties", "dare_linear")
    out: dict[str, Any] = {"merge_method": method}
    if recipe.get("base_model") is not None:
        out["base_model"] = _mergekit_ref(recipe["base_model"], "base_model")
        if not has_base:
            notes.append("base_model: mergekit's linear merge takes no base model; it is kept as written.")
    models = []
    for i, entry in enumerate(recipe.get("models") or []):
        entry = {"model": entry} if isinstance(entry, str) else entry
        params = dict(entry.get("parameters") or {})
        if "weight" not in params and "weight" not in glob:
            params["weight"] = 1.0  # evo-merge's default; mergekit requires an explicit weight
        if not takes_density and "density" in params:
            params.pop("density")
            notes.append(f"models[{i}].parameters.density: {method} does not sparsify in mergekit; dropped.")
        models.append({"model": _mergekit_ref(entry["model"], f"models[{i}].model"), "parameters": params})
    out["models"] = models

    params_out: dict[str, Any] = {}
    for key, value in glob.items():
        if key in ("normalize", "int8_mask", "weight"):
            params_out[key] = value
        elif key == "density":
            if takes_density:
                params_out[key] = value
            else:
                notes.append(f"parameters.density: {method} does not sparsify in mergekit; dropped.")
        elif key == "lambda":
            if method == "linear":
                notes.append("parameters.lambda: mergekit's linear merge has no lambda; dropped.")
            else:
                params_out[key] = value
        elif key == "rescale":
            if value in _RESCALE_TO_MERGEKIT and method.startswith("dare"):
                params_out["rescale"] = _RESCALE_TO_MERGEKIT[value]
            elif value in _RESCALE_TO_MERGEKIT and _RESCALE_TO_MERGEKIT[value] is False:
                pass  # no rescaling is mergekit's behaviour for the other methods anyway
            else:
                notes.append(
                    f"parameters.rescale: {value!r} has no mergekit equivalent for {method}; dropped."
                )
        elif key == "sparsify":
            expected = _MERGEKIT_SPARSIFIER.get(method)
            if value != expected:
                notes.append(
                    f"parameters.sparsify: {value!r} is evo-merge-only; mergekit's {method} "
                    + (f"trims with {expected} selection instead." if expected else "does not sparsify.")
                    + " Dropped: the mergekit merge will differ."
                )
        else:
            notes.append(f"parameters.{key}: not a mergekit parameter; dropped.")
    if params_out:
        out["parameters"] = params_out
    for key in ("dtype", "out_dtype"):
        if recipe.get(key) is not None:
            out[key] = recipe[key]
    if recipe.get("tokenizer_source") is not None:
        source = recipe["tokenizer_source"]
        out["tokenizer_source"] = (
            source if source in ("base", "union") else _mergekit_ref(source, "tokenizer_source")
        )
    if method.startswith("dare"):
        notes.append(
            "seed: mergekit draws its own DARE masks; the mergekit merge is not bit-identical to evo-merge's."
        )
    dropped = sorted(
        set(recipe)
        - {
            "merge_method",
            "base_model",
            "models",
            "parameters",
            "dtype",
            "out_dtype",
            "tokenizer_source",
            "seed",
            "provenance",
        }
    )
    for key in dropped:
        notes.append(f"{key}: evo-merge-only key; dropped.")
    return out, notes
