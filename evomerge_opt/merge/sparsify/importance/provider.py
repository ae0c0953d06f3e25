"""The importance provider of a recipe: :class:`HessianImportance` and :func:`importance_from_recipe`.

:class:`HessianImportance` gives :class:`~evomerge_opt.merge._base.ImportanceProvider`'s
``column_scale(i, name)`` from the calibration Hessians of source ``i`` (computed once and cached,
:mod:`~evomerge_opt.merge.sparsify.importance.cache`); :func:`importance_from_recipe` builds it from a
PS recipe's ``calibration:`` (``None`` when the recipe does not use ``sparsify: sparsegpt``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.merge.sparsify.importance.cache import cached_column_scales
from evomerge_opt.merge.sparsify.importance.scores import CRITERIA, DEFAULT_DAMP, DIAG_PREFIX


class HessianImportance:
    """:class:`~evomerge_opt.merge._base.ImportanceProvider` from calibration Hessians of each source.

    ``source_refs[i]`` is source ``i`` (``TensorContext.source_index``; the order of the recipe's
    ``models``). ``calibration`` is one list of :class:`~evomerge_opt.data.spec.DataSpec` shared by
    every source, or one list per source (``per_source=True``: each fine-tune calibrated on its own
    task data). ``num_samples`` caps the calibration rows (spread evenly over the datasets); specs
    without ``seq_len`` use ``seq_len``. Sources are processed one at a time (one model in memory);
    results are cached on disk and in memory, so every later lookup is a dictionary access.

    ``criterion``: ``sparsegpt`` (default) gives ``diag(U)^2`` (score ``d^2 / diag(U)^2``, SparseGPT's
    OBS saliency: the error left after the optimal update of the other weights); ``wanda`` gives
    ``1 / diag(H)`` (score ``d^2 * diag(H)``: the output error of zeroing one entry with no update,
    Wanda's criterion squared). Both come from the same cached Hessian pass.
    """

    def __init__(
        self,
        source_refs: Sequence[str],
        calibration: Sequence[Any] | Sequence[Sequence[Any]],
        tokenizer: Any,
        *,
        per_source: bool = False,
        num_samples: int | None = 128,
        seq_len: int = 512,
        batch_size: int = 8,
        damp: float = DEFAULT_DAMP,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = torch.float32,
        cache_dir: str | os.PathLike[str] | None = None,
        method: str = "layerwise",
        base_model: str | None = None,
        store_hessians: bool = False,
        criterion: str = "sparsegpt",
        lazy: bool = True,
    ) -> None:
        if not source_refs:
            raise ConfigError("SparseGPT importance needs at least one source model, but got none.")
        if per_source and len(calibration) != len(source_refs):
            raise ConfigError(
                f"With per-source calibration there must be one dataset list per source, but got "
                f"{len(calibration)} lists for {len(source_refs)} sources."
            )
        if not calibration:
            raise ConfigError(
                "SparseGPT importance needs calibration data, but got none; give `calibration:` datasets."
            )
        if criterion not in CRITERIA:
            raise ConfigError(f"Importance `criterion` must be one of {', '.join(CRITERIA)}, but got {criterion!r}.")
        self.criterion = criterion
        self.source_refs = [os.fspath(r) for r in source_refs]
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.damp = damp
        self.device = device
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.method = method
        self.base_model = base_model
        self.store_hessians = store_hessians
        self._windows_cache_dir = None if cache_dir is None else Path(cache_dir).parent / "windows"
        if per_source:  # one spec or one list of specs per source
            lists = [c if isinstance(c, (list, tuple)) else [c] for c in calibration]
        else:
            lists = [calibration] * len(self.source_refs)
        self._calibration = [list(specs) for specs in lists]
        self._windows: dict[str, Any] = {}
        self._scales: dict[int, dict[str, torch.Tensor]] = {}
        self._hessians: dict[int, dict[str, torch.Tensor]] = {}
        self.cache_files: dict[int, Path] = {}
        if not lazy:
            self.compute_all()

    @property
    def calibration_lists(self) -> list[list[Any]]:
        """The calibration dataset specs of each source (shared lists repeat)."""
        return [list(specs) for specs in self._calibration]

    def calibration_windows(self, source_index: int):
        """The calibration windows of source ``source_index`` (datasets merged, capped at ``num_samples``)."""
        from evomerge_opt.data.spec import DataSpec
        from evomerge_opt.data.windows import TokenWindows, load_windows

        # Shared calibration lists give equal keys, so the windows are built once for all sources.
        key = repr(self._calibration[source_index])
        if key in self._windows:
            return self._windows[key]
        specs = [DataSpec.parse(s, seq_len=self.seq_len) for s in self._calibration[source_index]]
        parts = [load_windows(s, self.tokenizer, self._windows_cache_dir) for s in specs]
        if self.num_samples is not None:
            # An even share per dataset (the remainder to the first ones), each its first rows.
            share = [self.num_samples // len(parts) + (i < self.num_samples % len(parts)) for i in range(len(parts))]
            parts = [p.select(n) for p, n in zip(parts, share) if n > 0]
        windows = TokenWindows.concat(parts, name="calibration")
        self._windows[key] = windows
        return windows

    def compute_all(self) -> dict[int, Path]:
        """Compute (or read from the cache) every source's column scales; returns the cache files."""
        for index in range(len(self.source_refs)):
            self._load(index)
        return dict(self.cache_files)

    def _load(self, source_index: int) -> dict[str, torch.Tensor]:
        if source_index not in self._scales:
            if not 0 <= source_index < len(self.source_refs):
                raise ConfigError(
                    f"SparseGPT importance has {len(self.source_refs)} sources, but source {source_index} was asked."
                )
            scales, path = cached_column_scales(
                self.source_refs[source_index], self.calibration_windows(source_index),
                cache_dir=self.cache_dir, batch_size=self.batch_size, damp=self.damp, device=self.device,
                dtype=self.dtype, method=self.method, store_hessians=self.store_hessians,
                base_model=self.base_model,
            )
            self._scales[source_index] = scales
            self.cache_files[source_index] = path
        return self._scales[source_index]

    def hessian(self, source_index: int, tensor_name: str) -> torch.Tensor | None:
        """The undamped ``H`` ``[in, in]`` of a decoder Linear (needs ``store_hessians=True``), else None."""
        if not self.store_hessians:
            raise ConfigError("Full Hessians are kept only with HessianImportance(..., store_hessians=True).")
        if source_index not in self._hessians:
            import safetensors.torch as st

            self._load(source_index)
            path = self.cache_files[source_index]
            self._hessians[source_index] = st.load_file(str(path.with_name(path.name.replace(".safetensors",
                                                                                               ".H.safetensors"))))
        return self._hessians[source_index].get(tensor_name)

    def column_scale(self, source_index: int, tensor_name: str) -> torch.Tensor | None:
        scales = self._load(source_index)
        if self.criterion == "wanda":
            diag = scales.get(DIAG_PREFIX + tensor_name)
            return None if diag is None else diag.reciprocal()
        return scales.get(tensor_name)


# ----------------------------------------------------------------------------------------- recipes


def _recipe_field(recipe: Any, key: str, default: Any = None) -> Any:
    if isinstance(recipe, dict):
        return recipe.get(key, default)
    value = getattr(recipe, key, None)
    if value is None and hasattr(recipe, "provenance"):
        extra = getattr(recipe, "model_extra", None) or {}
        value = extra.get(key)
    return default if value is None else value


def recipe_uses_sparsegpt(recipe: Any) -> bool:
    def mentions(value: Any) -> bool:
        if value == "sparsegpt":
            return True
        if isinstance(value, list):
            return any(isinstance(v, dict) and v.get("value") == "sparsegpt" for v in value)
        return False

    params = _recipe_field(recipe, "parameters", {}) or {}
    if mentions(params.get("sparsify")):
        return True
    for entry in _recipe_field(recipe, "models", []) or []:
        entry_params = entry.get("parameters", {}) if isinstance(entry, dict) else (entry.parameters or {})
        if mentions((entry_params or {}).get("sparsify")):
            return True
    return False


def importance_from_recipe(
    recipe: Any,
    device: str | torch.device = "cpu",
    calibration: Sequence[Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> HessianImportance | None:
    """The SparseGPT importance provider a PS recipe needs, or ``None`` when it does not use ``sparsegpt``.

    The recipe (a :class:`PSRecipe` or its dict) may carry ``calibration:`` as a list of dataset specs,
    or as ``{datasets: [...], num_samples: 128, seq_len: 512, batch_size: 8, per_source: false,
    criterion: sparsegpt}`` (``per_source: true``: ``datasets[i]`` calibrates ``models[i]`` only);
    ``calibration`` (e.g. the CLI's ``--calibration``) overrides it. Sources are the recipe's
    ``models`` in order; the tokenizer is the recipe's ``tokenizer_source`` or base model's.
    """
    if not recipe_uses_sparsegpt(recipe):
        return None
    settings: dict[str, Any] = {}
    raw = calibration if calibration is not None else _recipe_field(recipe, "calibration")
    if isinstance(raw, dict):
        settings = {k: v for k, v in raw.items() if k != "datasets"}
        raw = raw.get("datasets")
    if not raw:
        raise ConfigError(
            "The recipe uses `sparsify: sparsegpt`, which ranks task-vector entries by calibration Hessians, "
            "but it gives no calibration data; add `calibration: [{path: data.jsonl}]` to the recipe "
            "(or pass --calibration DATA)."
        )
    unknown = set(settings) - {"num_samples", "seq_len", "batch_size", "per_source", "damp", "criterion"}
    if unknown:
        raise ConfigError(
            f"Unknown `calibration` settings {sorted(unknown)}; valid ones are datasets, num_samples, seq_len, "
            "batch_size, per_source, damp, criterion."
        )
    models = _recipe_field(recipe, "models", []) or []
    refs = [m["model"] if isinstance(m, dict) else m.model for m in models]
    resolve = getattr(recipe, "resolve_ref", None)
    if callable(resolve):
        refs = [resolve(r) for r in refs]
    base = _recipe_field(recipe, "base_model")
    tokenizer_source = _recipe_field(recipe, "tokenizer_source")
    tok_ref = base if tokenizer_source in (None, "base") else tokenizer_source
    if tok_ref is None:
        tok_ref = refs[0]
    if callable(resolve):
        tok_ref = resolve(tok_ref)
    from evomerge_opt.pool import load_tokenizer

    tokenizer = load_tokenizer(tok_ref)
    base_ref = resolve(base) if callable(resolve) and base else base
    return HessianImportance(
        refs, raw, tokenizer, per_source=bool(settings.get("per_source", False)),
        num_samples=settings.get("num_samples", 128), seq_len=settings.get("seq_len", 512),
        batch_size=settings.get("batch_size", 8), damp=settings.get("damp", DEFAULT_DAMP), device=device,
        cache_dir=cache_dir, base_model=base_ref, criterion=settings.get("criterion", "sparsegpt"),
    )
