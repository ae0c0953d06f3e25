"""PNG plots of a study: optimisation history (baselines marked), parameter importances, the best PS
recipe's per-layer weight/density profile and the best DFS path as a layer-by-hop heat map.

Everything is read from the study's attributes (the contract in docs/ARCHITECTURE.md): trial values,
``trial.user_attrs['baseline' | 'recipe']`` and ``study.user_attrs['objectives']``; no model is loaded
(only a ``config.json`` is read, to know how many layers a PS gradient spans). Figures are drawn with
matplotlib's object API (Agg canvas, no pyplot global state) and written atomically.
"""

from __future__ import annotations

import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from evomerge_opt.io.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

# Below this many completed trials an importance estimate is noise; the plot says so instead.
MIN_TRIALS_FOR_IMPORTANCE = 4
MAX_IMPORTANCE_BARS = 25
# Representative tensor names for a PS parameter given per filter (first match wins in a recipe).
_PROBE_TENSORS = {
    "attention": "model.layers.{layer}.self_attn.q_proj.weight",
    "mlp": "model.layers.{layer}.mlp.up_proj.weight",
}


def _save(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def _objective_names(study: optuna.Study) -> list[str]:
    names = study.user_attrs.get("objectives")
    n = len(study.directions)
    if isinstance(names, list) and len(names) == n:
        return [str(x) for x in names]
    return ["perplexity"] if n == 1 else [f"objective {i}" for i in range(n)]


def _completed(study: optuna.Study) -> list[FrozenTrial]:
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values is not None
    ]


def _ranked(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials, best first (minimisation; several objectives: by the first, then the sum)."""
    signs = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions]
    return sorted(
        _completed(study), key=lambda t: (signs[0] * t.values[0], sum(s * v for s, v in zip(signs, t.values)))
    )


def _message_figure(title: str, message: str) -> Figure:
    fig = Figure(figsize=(7, 2.5))
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------- history
def plot_history(study: optuna.Study, path: Path) -> Path:
    """Objective value per trial, best-so-far line, baselines as labelled stars, pruned/failed marked."""
    trials = study.get_trials(deepcopy=False)
    names = _objective_names(study)
    fig = Figure(figsize=(9, 3.6 * len(names)))
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    minimise = [d == optuna.study.StudyDirection.MINIMIZE for d in study.directions]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    for k, (ax, name) in enumerate(zip(axes, names)):
        regular = [t for t in complete if "baseline" not in t.user_attrs]
        baselines = [t for t in complete if "baseline" in t.user_attrs]
        ax.scatter(
            [t.number for t in regular],
            [t.values[k] for t in regular],
            s=14,
            color="tab:blue",
            label="trial",
            zorder=3,
        )
        for t in baselines:
            ax.scatter(
                [t.number],
                [t.values[k]],
                marker="*",
                s=140,
                color="tab:orange",
                edgecolor="black",
                zorder=4,
                label="baseline" if t is baselines[0] else None,
            )
            ax.annotate(
                str(t.user_attrs["baseline"]),
                (t.number, t.values[k]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
                color="tab:orange",
            )
        if complete:
            ordered = sorted(complete, key=lambda t: t.number)
            best, line = math.inf if minimise[k] else -math.inf, []
            for t in ordered:
                best = min(best, t.values[k]) if minimise[k] else max(best, t.values[k])
                line.append(best)
            ax.step([t.number for t in ordered], line, where="post", color="tab:green", label="best so far")
            values = [t.values[k] for t in complete]
            finite = [v for v in values if math.isfinite(v) and v > 0]
            if finite and max(finite) / min(finite) > 20:  # perplexities of bad candidates span decades
                ax.set_yscale("log")
        pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
        if pruned and len(names) == 1:
            ax.scatter(
                [t.number for t in pruned],
                [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                marker="x",
                s=20,
                color="tab:gray",
                label="pruned (last report)",
                zorder=2,
            )
        failed = [t.number for t in trials if t.state == TrialState.FAIL]
        if failed:
            for i, n in enumerate(failed):
                ax.axvline(n, color="tab:red", alpha=0.25, lw=1, label="failed" if i == 0 else None)
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{name} ({'lower' if minimise[k] else 'higher'} is better)")
        ax.grid(alpha=0.3)
        if complete or pruned or failed:
            ax.legend(fontsize=8, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no finished trial yet", transform=ax.transAxes, ha="center")
    axes[0].set_title(f"study {study.study_name}: optimisation history ({len(trials)} trials)")
    return _save(fig, path)


# ------------------------------------------------------------------------------------- importance
def plot_importances(study: optuna.Study, path: Path) -> Path:
    """Parameter importances of the first objective; too few trials -> a figure that says so."""
    title = f"study {study.study_name}: parameter importances"
    regular = [t for t in _completed(study) if t.params]
    importances: dict[str, float] = {}
    reason = ""
    if len(regular) < MIN_TRIALS_FOR_IMPORTANCE:
        reason = (
            f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials with "
            f"parameters;\nthis study has {len(regular)}. Run more trials and report again."
        )
    else:
        # PED-ANOVA ranks what makes the target LOW: pass the first objective, negated when maximised.
        sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
        target = None if len(study.directions) == 1 else (lambda t: sign * t.values[0])
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=".*computes the importances of params to achieve low"
                )
                importances = optuna.importance.get_param_importances(study, target=target)
        except (RuntimeError, ValueError) as exc:  # e.g. every trial used the same parameters
            reason = f"Parameter importances could not be estimated: {exc}"
        if not reason and not importances:
            reason = "No parameter varied across the completed trials; nothing to rank."
    if reason:
        logger.warning("%s: %s", title, reason.replace("\n", " "))
        return _save(_message_figure(title, reason), path)
    items = list(importances.items())[:MAX_IMPORTANCE_BARS][::-1]
    fig = Figure(figsize=(8, 0.3 * len(items) + 1.5))
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel(f"importance for {_objective_names(study)[0]} (normalised)")
    shown = (
        ""
        if len(importances) <= MAX_IMPORTANCE_BARS
        else f", top {MAX_IMPORTANCE_BARS} of {len(importances)}"
    )
    ax.set_title(f"{title} ({len(regular)} trials{shown})")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------- PS profile
def ps_parts(recipe: Any) -> list[dict[str, Any]]:
    """The PS recipes inside a recipe: itself (PS) or the inline ones among a DFS recipe's model_paths."""
    if not isinstance(recipe, dict):
        return []
    if "merge_method" in recipe:
        return [recipe]
    parts = []
    for entry in recipe.get("model_paths") or []:
        if isinstance(entry, dict) and "merge_method" in entry:
            parts.append(entry)
        elif (
            isinstance(entry, (list, tuple))
            and entry
            and isinstance(entry[0], dict)
            and "merge_method" in entry[0]
        ):
            parts.append(entry[0])
    return parts


def _config_layers(model_ref: Any) -> int | None:
    """num_hidden_layers from a local model's config.json (no weights loaded), else None."""
    from evomerge_opt.errors import ModelSourceError
    from evomerge_opt.io.sources import resolve_model_ref

    if not isinstance(model_ref, str):
        return None
    try:
        config = Path(resolve_model_ref(model_ref)) / "config.json"
    except ModelSourceError:
        return None
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    layers = data.get("num_hidden_layers") or (data.get("text_config") or {}).get("num_hidden_layers")
    return int(layers) if layers else None


def _num_layers(part: dict[str, Any]) -> tuple[int, bool]:
    """(layers, known): from the base (or first source) config, else the longest per-layer list."""
    refs = [part.get("base_model")] + [
        m.get("model") for m in part.get("models") or [] if isinstance(m, dict)
    ]
    for ref in refs:
        layers = _config_layers(ref)
        if layers:
            return layers, True
    longest = 1
    for m in part.get("models") or []:
        for value in (m.get("parameters") or {}).values():
            if isinstance(value, list) and value and not isinstance(value[0], dict):
                longest = max(longest, len(value))
    return longest, False


def _profile(value: Any, num_layers: int) -> dict[str, list[float]]:
    """label -> per-layer values of one recipe parameter ('' when one curve covers every tensor)."""
    from evomerge_opt.config.recipe import resolve_param

    def curve(tensor: str) -> list[float]:
        return [float(resolve_param(value, tensor.format(layer=i), i, num_layers)) for i in range(num_layers)]

    if isinstance(value, list) and value and isinstance(value[0], dict):  # per-filter values
        curves = {label: curve(tensor) for label, tensor in _PROBE_TENSORS.items()}
        if len({tuple(c) for c in curves.values()}) == 1:
            return {"": next(iter(curves.values()))}
        return curves
    return {"": curve(_PROBE_TENSORS["mlp"])}


def _short(ref: Any) -> str:
    text = str(ref)
    return text if text.startswith("zoo:") else (Path(text).name or text)


def plot_ps_profile(trial: FrozenTrial, path: Path) -> Path | None:
    """Per-layer weight and density of every source of the trial's PS recipe(s); None if it has none."""
    parts = ps_parts(trial.user_attrs.get("recipe"))
    if not parts:
        return None
    keys = ["weight", "density"]
    fig = Figure(figsize=(9, 3.2 * len(keys)))
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    notes = []
    for p, part in enumerate(parts):
        layers, known = _num_layers(part)
        if not known:
            notes.append(f"{layers} layer(s) assumed: base model config not found")
        x = np.arange(layers)
        for ax, key in zip(axes, keys):
            for m in part.get("models") or []:
                params = m.get("parameters") or {}
                if key not in params:
                    continue
                for label, values in _profile(params[key], layers).items():
                    name = (
                        (f"[{p}] " if len(parts) > 1 else "")
                        + _short(m.get("model"))
                        + (f" ({label})" if label else "")
                    )
                    ax.plot(x, values, marker="o", ms=3, label=name)
    for ax, key in zip(axes, keys):
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, f"no {key} in this recipe", transform=ax.transAxes, ha="center")
    axes[-1].set_xlabel("decoder layer")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    methods = ", ".join(sorted({str(part.get("merge_method")) for part in parts}))
    value = ", ".join(f"{v:.4g}" for v in trial.values or [])
    title = f"best PS recipe: trial {trial.number} ({methods}), fitness {value}"
    if notes:
        title += "\n" + "; ".join(sorted(set(notes)))
    axes[0].set_title(title)
    return _save(fig, path)


# ------------------------------------------------------------------------------------- DFS path
def _scale_scalar(value: Any) -> float:
    """A hop's scaling as one number: the scalar, a vector's mean or a matrix's mean diagonal."""
    array = np.asarray(value, dtype=float)
    if array.ndim == 0:
        return float(array)
    if array.ndim == 1:
        return float(array.mean())
    return float(np.diagonal(array).mean())


def dfs_path_matrix(recipe: dict[str, Any]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``[M*L, T]`` scale per (source model x layer, hop), NaN where a layer is not on that hop.

    Hops follow the DFS order ``for r: for m: for l: if mask[r][m][l]``. ``scaling_factors`` has the
    leading shape ``[num_r][M][L]`` (a flat per-hop list of length T is accepted too); missing -> 1.
    """
    mask = np.asarray(recipe["layer_mask"], dtype=bool)  # [num_r, M, L]
    if mask.ndim != 3:
        raise ValueError(f"layer_mask must have shape [num_r][M][L], but got shape {mask.shape}.")
    num_r, num_models, num_layers = mask.shape
    hops = [
        (r, m, l) for r in range(num_r) for m in range(num_models) for l in range(num_layers) if mask[r, m, l]
    ]
    scales = recipe.get("scaling_factors")
    out = np.full((num_models * num_layers, len(hops)), np.nan)
    for t, (r, m, l) in enumerate(hops):
        if scales is None:
            s = 1.0
        elif len(scales) == num_r and isinstance(scales[0], list) and len(scales[0]) == num_models:
            s = _scale_scalar(scales[r][m][l])
        elif len(scales) == len(hops):
            s = _scale_scalar(scales[t])
        else:
            raise ValueError(
                f"scaling_factors must have the leading shape [num_r][M][L] = [{num_r}][{num_models}][{num_layers}] "
                f"or one entry per hop ({len(hops)}), but got {len(scales)} entries."
            )
        out[m * num_layers + l, t] = s
    return out, [(m, l) for _, m, l in hops]


def _model_label(entry: Any, index: int) -> str:
    if isinstance(entry, dict):
        return f"PS[{index}] {entry.get('merge_method', '')}".strip()
    if isinstance(entry, (list, tuple)) and entry:
        entry = entry[0]
        if isinstance(entry, dict):
            return f"PS[{index}] {entry.get('merge_method', '')}".strip()
    return _short(entry)


def plot_dfs_path(trial: FrozenTrial, path: Path) -> Path | None:
    recipe = trial.user_attrs.get("recipe")
    if not isinstance(recipe, dict) or "layer_mask" not in recipe:
        return None
    matrix, hops = dfs_path_matrix(recipe)
    num_models = len(recipe["layer_mask"][0])
    num_layers = matrix.shape[0] // max(num_models, 1)
    names = [_model_label(e, i) for i, e in enumerate(recipe.get("model_paths") or [])]
    names += [f"model {i}" for i in range(len(names), num_models)]
    value = ", ".join(f"{v:.4g}" for v in trial.values or [])
    title = (
        f"best DFS path: trial {trial.number}, {len(hops)} hops, num_r={len(recipe['layer_mask'])}, "
        f"fitness {value}"
    )
    if not hops:
        return _save(_message_figure(title, "The layer mask selects no layer: the path is empty."), path)
    fig = Figure(figsize=(max(6.0, 0.25 * len(hops) + 3), max(3.0, 0.22 * matrix.shape[0] + 1.5)))
    ax = fig.add_subplot()
    finite = matrix[np.isfinite(matrix)]
    span = max(abs(finite.max() - 1.0), abs(finite.min() - 1.0), 1e-3)
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        aspect="auto",
        interpolation="nearest",
        cmap="coolwarm",
        vmin=1.0 - span,
        vmax=1.0 + span,
    )
    fig.colorbar(image, ax=ax, label="scale at the hop (vector: mean, matrix: mean diagonal)")
    ax.set_yticks(
        range(matrix.shape[0]),
        [f"{names[i // num_layers]} L{i % num_layers}" for i in range(matrix.shape[0])],
        fontsize=7,
    )
    step = max(1, len(hops) // 30)
    ax.set_xticks(range(0, len(hops), step))
    for boundary in range(num_layers, matrix.shape[0], num_layers):
        ax.axhline(boundary - 0.5, color="black", lw=0.8)
    ax.set_xlabel("hop")
    ax.set_ylabel("source model x layer")
    ax.set_title(title)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ report
def _best_with(study: optuna.Study, predicate: Any) -> FrozenTrial | None:
    """Best completed trial whose recipe satisfies ``predicate``: a searched one if any (a baseline's
    uniform recipe says nothing about what evolution found), else a baseline."""
    matching = [t for t in _ranked(study) if predicate(t.user_attrs.get("recipe"))]
    searched = [t for t in matching if "baseline" not in t.user_attrs]
    return (searched or matching or [None])[0]


def write_report(study: optuna.Study, out_dir: str | Path) -> list[Path]:
    """Write the study's plots into ``out_dir``; returns the files written (skipped plots are logged)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_history(study, out / "history.png"), plot_importances(study, out / "importances.png")]
    best_ps = _best_with(study, lambda r: bool(ps_parts(r)))
    if best_ps is None:
        logger.info("No completed trial has a PS recipe: skipping the PS profile plot.")
    else:
        written.append(plot_ps_profile(best_ps, out / "best_ps_profile.png"))
    best_dfs = _best_with(study, lambda r: isinstance(r, dict) and "layer_mask" in r)
    if best_dfs is None:
        logger.info("No completed trial has a DFS recipe: skipping the DFS path plot.")
    else:
        written.append(plot_dfs_path(best_dfs, out / "best_dfs_path.png"))
    return [p for p in written if p is not None]
