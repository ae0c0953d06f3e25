"""Compare TIES/DARE merges with magnitude/random and SparseGPT trimming (seeds 001 and 004).

``MergeComparison`` (alias ``LLaMAMerger``, the seeds' name) merges the fine-tunes of one base four
ways at one density, saves each merged model, and scores each by perplexity:

===================  ==============  =========================================================
key                  merge method    trimming
===================  ==============  =========================================================
``ties_magnitude``   ``ties``        top-k by ``|d|``
``dare_random``      ``dare_linear`` ``Bernoulli(density)`` then ``d / density``
``ties_sparsegpt``   ``ties``        top-k by SparseGPT importance ``d^2 / diag(U)^2``
``dare_sparsegpt``   ``dare_linear`` top-k by SparseGPT importance, then the ``l1`` rescale
===================  ==============  =========================================================

On request, ``ties_sparsegpt_obs``: TIES whose decoder Linear task vectors are trimmed by SparseGPT
*with* its error-compensating OBS update (:func:`~evomerge_opt.merge.sparsify.importance.obs_trim`; kept
entries change, so no recipe expresses it; other tensors as ``ties_magnitude``).

Every source gets weight 1 and the same density; TIES and DARE normalise by the total weight (a mean
of the kept updates). The models are built with the merge engine's
:class:`~evomerge_opt.merge.resident.ResidentMerger` (base and task vectors loaded once); SparseGPT
importance comes from :class:`~evomerge_opt.merge.sparsify.importance.HessianImportance` (Hessians of each
fine-tune on the calibration data, cached by content). Results go to
``<output_dir>/comparison_results.json``; models to ``<output_dir>/<key>/`` (HF directories with
the tokenizer and the recipe that built them).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.data.spec import DataSpec
from evomerge_opt.data.windows import TokenWindows, load_windows
from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.perplexity import FitnessResult, PerplexityEvaluator

logger = logging.getLogger(__name__)

METHODS: dict[str, tuple[str, str]] = {
    # key -> (display name, description)
    "ties_magnitude": ("TIES-Magnitude", "ties, top-k by |d|"),
    "dare_random": ("DARE-Random", "DARE random drop + rescale"),
    "ties_sparsegpt": ("TIES-SparseGPT", "ties, top-k by d^2/diag(U)^2"),
    "dare_sparsegpt": ("DARE-SparseGPT", "DARE with top-k by d^2/diag(U)^2 + rescale"),
    "ties_sparsegpt_obs": ("TIES-SparseGPT+OBS", "ties, SparseGPT trimming with its OBS update"),
}
# The seeds' four; `ties_sparsegpt_obs` runs when asked for (it keeps full Hessians: in^2 floats per Linear).
DEFAULT_METHODS = ("ties_magnitude", "dare_random", "ties_sparsegpt", "dare_sparsegpt")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class MergeComparison:
    """Merge fine-tunes of ``base_model_path`` with TIES/DARE x magnitude/SparseGPT and compare perplexity.

    ``dataset_names``: calibration datasets (paths, ``zoo:...``, dicts or :class:`DataSpec`), shared by
    every fine-tune (their mix), or paired one-to-one with ``finetuned_model_paths`` when
    ``pair_calibration`` (default ``None``: paired when there is one dataset per fine-tune, as in the
    seeds' ``--finetuned_models m1 m2 --datasets d1 d2``).
    DARE-SparseGPT keeps a deterministic top-k, so DARE's ``1/density`` rescale (right for a random
    mask, whose expectation it preserves) would blow the kept entries up; it uses ``l1`` (the kept
    entries rescaled to the task vector's L1 mass) unless ``dare_sparsegpt_rescale`` says otherwise.
    ``criterion``: ``sparsegpt`` (``d^2 / diag(U)^2``) or ``wanda`` (``d^2 * diag(H)``).
    ``eval_data``: evaluation datasets (same forms); when ``None`` the calibration datasets are used
    (in-sample, logged as a warning). ``num_calibration_samples`` rows in all (split evenly over the
    datasets) of at most ``calibration_seq_length`` tokens. ``cache_dir`` holds ``hessians/``,
    ``task_vectors/`` and ``windows/`` (default: evo-merge's cache).
    """

    def __init__(
        self,
        base_model_path: str,
        finetuned_model_paths: Sequence[str],
        dataset_names: Sequence[Any],
        output_dir: str | os.PathLike[str] = "./merged_models",
        cache_dir: str | os.PathLike[str] | None = None,
        density: float = 0.2,
        num_calibration_samples: int = 128,
        calibration_seq_length: int = 512,
        device: str | None = None,
        eval_data: Sequence[Any] | None = None,
        *,
        eval_num_samples: int | None = 200,
        eval_seq_length: int = 512,
        batch_size: int = 8,
        seed: int = 0,
        dtype: str | None = "float32",
        dare_method: str = "dare_linear",
        dare_rescale: str = "inverse_density",
        dare_sparsegpt_rescale: str = "l1",
        pair_calibration: bool | None = None,
        criterion: str = "sparsegpt",
        save_models: bool = True,
    ) -> None:
        if not finetuned_model_paths:
            raise ConfigError("MergeComparison needs at least one fine-tuned model, but got none.")
        if not 0 < density <= 1:
            raise ConfigError(f"`0 < density <= 1` must hold, but got density={density}; use a value in (0, 1].")
        if not dataset_names:
            raise ConfigError(
                "MergeComparison needs calibration datasets (--calibration) for the SparseGPT Hessians, but got none."
            )
        if pair_calibration is None:  # auto: one dataset per fine-tune (the seeds' CLI) pairs them
            pair_calibration = len(dataset_names) == len(finetuned_model_paths) and len(dataset_names) > 1
        if pair_calibration and len(dataset_names) != len(finetuned_model_paths):
            raise ConfigError(
                f"With paired calibration there must be one dataset per fine-tune, but got {len(dataset_names)} "
                f"datasets for {len(finetuned_model_paths)} fine-tunes."
            )
        if dare_method not in ("dare_linear", "dare_ties"):
            raise ConfigError(f"`dare_method` must be dare_linear or dare_ties, but got {dare_method!r}.")
        self.base_model_path = str(base_model_path)
        self.finetuned_model_paths = [str(p) for p in finetuned_model_paths]
        self.dataset_names = list(dataset_names)
        self.output_dir = Path(output_dir)
        self.cache_root = Path(cache_dir) if cache_dir is not None else None
        self.density = float(density)
        self.num_calibration_samples = num_calibration_samples
        self.calibration_seq_length = calibration_seq_length
        self.device = device or default_device()
        self.eval_data = list(eval_data) if eval_data else None
        self.eval_num_samples = eval_num_samples
        self.eval_seq_length = eval_seq_length
        self.batch_size = batch_size
        self.seed = seed
        self.dtype = dtype
        self.dare_method = dare_method
        self.dare_rescale = dare_rescale
        self.dare_sparsegpt_rescale = dare_sparsegpt_rescale
        self.criterion = criterion
        self.pair_calibration = pair_calibration
        self.save_models = save_models
        self._tokenizer: Any = None
        self._importance: Any = None
        self._obs_importance: Any = None
        self._merger: Any = None
        self._evaluators: dict[str, PerplexityEvaluator] = {}
        self.importance_seconds = 0.0

    # ------------------------------------------------------------------ shared pieces

    def _cache(self, kind: str) -> Path | None:
        return None if self.cache_root is None else self.cache_root / kind

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from evomerge_opt.pool import load_tokenizer

            self._tokenizer = load_tokenizer(self.base_model_path)
        return self._tokenizer

    @property
    def importance(self):
        """The SparseGPT importance provider (Hessians computed on first use, then cached)."""
        if self._importance is None:
            from evomerge_opt.merge.sparsify.importance import HessianImportance

            calibration = [[spec] for spec in self.dataset_names] if self.pair_calibration else self.dataset_names
            self._importance = HessianImportance(
                self.finetuned_model_paths, calibration, self.tokenizer, per_source=self.pair_calibration,
                num_samples=self.num_calibration_samples, seq_len=self.calibration_seq_length,
                batch_size=self.batch_size, device=self.device, cache_dir=self._cache("hessians"),
                base_model=self.base_model_path, criterion=self.criterion,
            )
        return self._importance

    def _resident(self):
        if self._merger is None:
            from evomerge_opt.merge.resident import ResidentMerger

            self._merger = ResidentMerger(self.base_model_path, self.finetuned_model_paths, device=self.device,
                                          dtype=self.dtype)
        return self._merger

    def recipe(self, method: str) -> dict[str, Any]:
        """The PS recipe (plain data) of a comparison method key (``ties_sparsegpt_obs``: its non-Linear part)."""
        if method not in METHODS:
            raise ConfigError(f"Unknown comparison method {method!r}; valid ones are {', '.join(METHODS)}.")
        if method == "ties_sparsegpt_obs":
            method = "ties_magnitude"
        ties = method.startswith("ties")
        sparsify = "sparsegpt" if method.endswith("sparsegpt") else ("magnitude" if ties else "random")
        parameters: dict[str, Any] = {"sparsify": sparsify, "normalize": True}
        if not ties:
            parameters["rescale"] = self.dare_sparsegpt_rescale if sparsify == "sparsegpt" else self.dare_rescale
        recipe: dict[str, Any] = {
            "merge_method": "ties" if ties else self.dare_method,
            "base_model": self.base_model_path,
            "models": [{"model": ref, "parameters": {"weight": 1.0, "density": self.density}}
                       for ref in self.finetuned_model_paths],
            "parameters": parameters,
            "seed": self.seed,
            "name": method,
        }
        if self.dtype:
            recipe["dtype"] = self.dtype
        return recipe

    # ------------------------------------------------------------------ the seed API

    def compute_and_save_task_vectors(self) -> list[Path]:
        """Task vector of every fine-tune as safetensors in the cache (keyed by content); returns the files."""
        from evomerge_opt.merge.task_vectors import compute_task_vector

        return [compute_task_vector(self.base_model_path, ref, self._cache("task_vectors"))
                for ref in self.finetuned_model_paths]

    def compute_and_save_hessians(self) -> dict[int, Path]:
        """SparseGPT column scales of every fine-tune (one model in memory at a time); returns the files."""
        start = time.perf_counter()
        files = self.importance.compute_all()
        self.importance_seconds += time.perf_counter() - start
        return files

    def merge(self, method: str, in_place: bool = False) -> Any:
        """The merged model of ``method``. ``in_place``: the resident model itself, rebuilt by the next call."""
        recipe = self.recipe(method)
        merger = self._resident()
        if method.endswith("sparsegpt"):
            self.compute_and_save_hessians()
            merger.importance = self.importance
        model = merger.build(recipe)
        if method == "ties_sparsegpt_obs":
            self._apply_obs(model)
        return model if in_place else copy.deepcopy(model)

    def _apply_obs(self, model: Any) -> None:
        """Overwrite every decoder Linear weight with TIES over OBS-trimmed task vectors (weights 1)."""
        from safetensors import safe_open

        from evomerge_opt.io.sources import resolve_model_ref
        from evomerge_opt.merge.sparsify.importance import HessianImportance, obs_trim
        from evomerge_opt.merge.task_vectors import checkpoint_files

        if self._obs_importance is None:
            imp = self.importance
            self._obs_importance = HessianImportance(
                imp.source_refs, imp.calibration_lists, self.tokenizer, per_source=True, num_samples=imp.num_samples,
                seq_len=imp.seq_len, batch_size=imp.batch_size, device=self.device, cache_dir=imp.cache_dir,
                base_model=self.base_model_path, store_hessians=True,
            )
        start = time.perf_counter()
        self._obs_importance.compute_all()
        self.importance_seconds += time.perf_counter() - start
        merger = self._resident()
        base_index = checkpoint_files(Path(resolve_model_ref(self.base_model_path)))
        params = dict(model.named_parameters())
        device = next(iter(params.values())).device
        with torch.no_grad():
            for name, param in params.items():
                hessians = [self._obs_importance.hessian(i, name) for i in range(len(self.finetuned_model_paths))]
                if any(h is None for h in hessians):
                    continue  # not a decoder Linear weight: keeps the TIES-Magnitude value
                with safe_open(str(base_index[name]), framework="pt", device=str(device)) as handle:
                    base = handle.get_tensor(name).float()
                trimmed = [obs_trim(merger.task_vector(i, name).to(device), self.density, h.to(device))
                           for i, h in enumerate(hessians)]
                # TIES elect (zero counts as +) and disjoint mean of the agreeing (non-zero) entries.
                sign = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
                agree = [(torch.sign(t) == sign).float() for t in trimmed]
                num = sum(t * a for t, a in zip(trimmed, agree))
                den = sum(agree)
                param.copy_((base + num / torch.where(den == 0, torch.ones_like(den), den)).to(param.dtype))

    def merge_with_ties(self, use_sparsegpt: bool = False) -> Any:
        return self.merge("ties_sparsegpt" if use_sparsegpt else "ties_magnitude")

    def merge_with_dare(self, use_sparsegpt: bool = False) -> Any:
        return self.merge("dare_sparsegpt" if use_sparsegpt else "dare_random")

    def _evaluator(self, eval_dataset: Any = None, num_samples: int | None = None) -> PerplexityEvaluator:
        specs = eval_dataset if eval_dataset is not None else self.eval_data
        if specs is None:
            logger.warning("no evaluation data given: scoring on the calibration data (in-sample)")
            specs = self.dataset_names
        if not isinstance(specs, (list, tuple)):
            specs = [specs]
        limit = self.eval_num_samples if num_samples is None else num_samples
        key = repr((specs, limit))
        if key not in self._evaluators:
            parsed = [DataSpec.parse(s, seq_len=self.eval_seq_length, num_samples=limit) for s in specs]
            windows: list[tuple[str, TokenWindows, float]] = [
                (s.name or f"eval{i}", load_windows(s, self.tokenizer, self._cache("windows")), s.weight)
                for i, s in enumerate(parsed)
            ]
            self._evaluators[key] = PerplexityEvaluator(windows, batch_size=self.batch_size, device=self.device)
        return self._evaluators[key]

    def evaluate_model(self, model: Any, tokenizer: Any = None, eval_dataset: Any = None,
                       num_samples: int | None = None) -> dict[str, Any]:
        """Perplexity of ``model`` on ``eval_dataset`` (default: the comparison's evaluation data).

        ``tokenizer`` defaults to the base's; ``num_samples`` caps the rows per dataset (default
        ``eval_num_samples``). Returns ``{perplexity, avg_loss, per_dataset, tokens, seconds,
        tokens_per_second}``.
        """
        if tokenizer is not None:
            self._tokenizer = tokenizer
        result: FitnessResult = self._evaluator(eval_dataset, num_samples).evaluate(model)
        return {
            "perplexity": result.perplexity,
            "avg_loss": result.loss,
            "per_dataset": {k: {"perplexity": v.perplexity, "loss": v.loss, "tokens": v.tokens}
                            for k, v in result.per_dataset.items()},
            "tokens": result.tokens,
            "seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second,
        }

    def _save(self, model: Any, method: str) -> Path:
        from evomerge_opt.config.yamlio import save_yaml
        from evomerge_opt.io.atomic import atomic_output_dir

        target = self.output_dir / method
        with atomic_output_dir(target, overwrite=True) as staging:
            model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            header = "Built by evo-merge compare"
            if "sparsegpt" in method:
                header += " (SparseGPT importance from calibration Hessians)"
            if method == "ties_sparsegpt_obs":
                header += ("\nDecoder Linear weights: TIES over task vectors trimmed WITH SparseGPT's OBS update"
                           "\n(obs_trim); this recipe gives only the other tensors (TIES-Magnitude).")
            save_yaml(self.recipe(method), staging / "merge_recipe.yml", header=header)
        return target

    def evaluate_sources(self) -> dict[str, dict[str, Any]]:
        """Reference scores of the base and each fine-tune (one model in memory at a time)."""
        from evomerge_opt.merge.sparsify.importance import load_source_model

        out = {}
        for label, ref in [("base", self.base_model_path)] + [
            (f"finetune_{i}", r) for i, r in enumerate(self.finetuned_model_paths)
        ]:
            model = load_source_model(ref, dtype=None, device=self.device, base_model=self.base_model_path)
            out[label] = {"method": label, "model": ref, **self.evaluate_model(model)}
            del model
        return out

    def merge_all_methods(self, methods: Sequence[str] | None = None,
                          include_sources: bool = False) -> dict[str, dict[str, Any]]:
        """Merge, save and score every method; write ``comparison_results.json``; return the results.

        ``time_seconds`` is the merge time plus, for SparseGPT methods, the Hessian time (zero when the
        Hessians came from the cache; the first SparseGPT method pays it).
        """
        import json

        from evomerge_opt.io.atomic import atomic_write_text

        methods = list(methods or DEFAULT_METHODS)
        for method in methods:
            if method not in METHODS:
                raise ConfigError(f"Unknown comparison method {method!r}; valid ones are {', '.join(METHODS)}.")
        results: dict[str, dict[str, Any]] = {}
        start = time.perf_counter()
        self._resident()  # base + task vectors, loaded once for all methods (not part of any row's time)
        setup_seconds = time.perf_counter() - start
        for method in methods:
            before = self.importance_seconds
            start = time.perf_counter()
            model = self.merge(method, in_place=True)
            total = time.perf_counter() - start
            hessian_seconds = self.importance_seconds - before
            path = self._save(model, method) if self.save_models else None
            scores = self.evaluate_model(model)
            results[method] = {
                "method": METHODS[method][0],
                "perplexity": scores["perplexity"],
                "avg_loss": scores["avg_loss"],
                "time_seconds": total,
                "merge_seconds": total - hessian_seconds,
                "hessian_seconds": hessian_seconds,
                "eval_seconds": scores["seconds"],
                "per_dataset": scores["per_dataset"],
                "tokens": scores["tokens"],
                "path": str(path) if path else None,
            }
            logger.info("%s: perplexity %.4f (loss %.4f) in %.1fs", METHODS[method][0], scores["perplexity"],
                        scores["avg_loss"], total)
        payload: dict[str, Any] = {
            "settings": {
                "base_model": self.base_model_path, "finetuned_models": self.finetuned_model_paths,
                "calibration": [_plain(s) for s in self.dataset_names],
                "eval_data": [_plain(s) for s in (self.eval_data or self.dataset_names)],
                "density": self.density, "num_calibration_samples": self.num_calibration_samples,
                "calibration_seq_length": self.calibration_seq_length, "eval_num_samples": self.eval_num_samples,
                "eval_seq_length": self.eval_seq_length, "dare_method": self.dare_method,
                "dare_rescale": self.dare_rescale, "dare_sparsegpt_rescale": self.dare_sparsegpt_rescale,
                "pair_calibration": self.pair_calibration, "criterion": self.criterion,
                "seed": self.seed, "device": str(self.device),
                "setup_seconds": setup_seconds,
            },
            "results": results,
        }
        if include_sources:
            payload["sources"] = self.evaluate_sources()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.output_dir / "comparison_results.json",
                          json.dumps(payload, indent=2, default=_json_default) + "\n")
        self.last_payload = payload
        return results


def _plain(spec: Any) -> Any:
    if isinstance(spec, DataSpec):
        return spec.model_dump(exclude_none=True)
    return os.fspath(spec) if isinstance(spec, os.PathLike) else spec


def _json_default(value: Any) -> Any:
    return str(value)  # paths, dtypes


def format_table(results: dict[str, dict[str, Any]], sources: dict[str, dict[str, Any]] | None = None) -> str:
    """The seeds' comparison table: method, perplexity, average loss, time (seconds)."""
    lines = [f"{'Method':<20}{'Perplexity':>14}{'Avg Loss':>12}{'Time (s)':>12}", "-" * 58]
    for row in results.values():
        lines.append(f"{row['method']:<20}{row['perplexity']:>14.4f}{row['avg_loss']:>12.4f}"
                     f"{row['time_seconds']:>12.1f}")
    if sources:
        lines.append("-" * 58)
        for label, row in sources.items():
            lines.append(f"{label:<20}{row['perplexity']:>14.4f}{row['avg_loss']:>12.4f}{'':>12}")
    datasets = sorted({name for row in results.values() for name in row.get("per_dataset", {})})
    if len(datasets) > 1:
        lines.append("")
        lines.append(f"{'Per dataset ppl':<20}" + "".join(f"{d[:14]:>16}" for d in datasets))
        for row in list(results.values()) + list((sources or {}).values()):
            label = row["method"]
            lines.append(f"{str(label)[:20]:<20}" + "".join(
                f"{row['per_dataset'][d]['perplexity']:>16.4f}" if d in row["per_dataset"] else f"{'-':>16}"
                for d in datasets))
    return "\n".join(lines)


LLaMAMerger = MergeComparison
