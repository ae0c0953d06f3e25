"""SparseGPT importance: Hessians of every decoder Linear's input over calibration tokens, and caches.

For a Linear with input ``X`` (rows = the calibration tokens that are not padding, ``N`` of them):

    H = (2/N) * sum_t x_t^T x_t                          [in, in]   (float32)
    H <- H + 0.01 * mean(diag H) * I                     (dead inputs, diag 0, get H_jj = 1 first)
    U = cholesky(H^-1, upper=True)                       [in, in]
    column_scale = diag(U)^2                             [in]
    importance(d) = d^2 / column_scale[None, :]          [out, in]  (d: the task vector)

Gathering (``method="layerwise"``, the default): the calibration batches run through the embeddings
once (a hook stops the forward at decoder layer 0 and keeps that layer's inputs and keyword arguments:
causal mask, rotary position embeddings, position ids); then each decoder layer in turn runs on the
kept hidden states with forward hooks on its Linears, and its outputs become the next layer's inputs.
Memory is one layer's activations for the calibration set plus one layer's Hessians; only the
``[in]``-sized column scales are kept. ``method="full"`` hooks every Linear and runs the whole model
batch by batch (memory: every Hessian at once); it is the reference the tests compare against and the
path for architectures whose layers need different masks (mixed ``layer_types``).

Caches (safetensors, under ``paths.cache_dir(...)``), keyed by content, never by list position:

* ``hessians/<sha256(model content, calibration tokens, settings)>.safetensors``: ``{weight name:
  diag(U)^2}`` for one source model; with ``store_hessians=True`` also ``<key>.H.safetensors`` holding
  every (undamped) ``H``, for SparseGPT's OBS update (:func:`evomerge_opt.merge.sparsegpt.obs_trim`).
* ``task_vectors/<sha256(base content, fine-tune content)>.safetensors``: ``x - b`` per tensor.

Model content = SHA-256 of its weight and config files (a PEFT adapter: adapter files + its base);
recomputed only when a file's size or mtime changes (memoised per process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.errors import ConfigError, ModelSourceError, ShapeMismatchError
from evomerge_opt.paths import cache_dir as default_cache_dir

logger = logging.getLogger(__name__)

HESSIAN_FORMAT_VERSION = 2
DIAG_PREFIX = "diagH::"  # cache entries holding diag(H_damped) (for the `wanda` criterion)
CRITERIA = ("sparsegpt", "wanda")
DEFAULT_DAMP = 0.01
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")
_FILE_HASH_MEMO: dict[tuple[str, int, int], str] = {}


# ----------------------------------------------------------------------------------------- hashing


def _hash_file(path: Path) -> str:
    from evomerge_opt.io.hashing import file_sha256

    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASH_MEMO:
        _FILE_HASH_MEMO[key] = file_sha256(path)
    return _FILE_HASH_MEMO[key]


def model_content_hash(ref: str | os.PathLike[str], base_model: str | None = None) -> str:
    """SHA-256 over a model directory's weight and config files (names and bytes).

    A PEFT adapter directory also hashes its base (``base_model`` or the adapter config's
    ``base_model_name_or_path``). A hub id is resolved to its local snapshot when cached; otherwise
    it cannot be hashed and a :class:`ModelSourceError` explains why.
    """
    from evomerge_opt.io.sources import is_peft_adapter, resolve_model_ref

    path = Path(resolve_model_ref(ref))
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(os.fspath(ref), local_files_only=True))
        except Exception as exc:  # any hub failure means "not available locally"
            raise ModelSourceError(
                f"Cannot hash model {os.fspath(ref)!r}: it is neither a local directory nor in the local hub "
                f"cache ({type(exc).__name__}); download it first."
            ) from exc
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_FILE_SUFFIXES)
                   and not p.name.startswith("."))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise ModelSourceError(f"Model directory {str(path)!r} holds no .safetensors or .bin weights.")
    for file in files:
        digest.update(file.name.encode() + b"\0" + _hash_file(file).encode())
    if is_peft_adapter(path):
        config = json.loads((path / "adapter_config.json").read_text())
        base = base_model or config.get("base_model_name_or_path")
        if not base:
            raise ModelSourceError(f"Adapter {str(path)!r} names no base model; pass base_model.")
        digest.update(b"base:" + model_content_hash(base).encode())
    return digest.hexdigest()


def state_dict_hash(model: torch.nn.Module) -> str:
    """SHA-256 over an in-memory model's tensors (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- model access


def load_source_model(ref: str, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                      base_model: str | None = None) -> torch.nn.Module:
    """One source model (a PEFT adapter is merged onto its base) via the pool's loader."""
    from evomerge_opt.pool import load_causal_lm

    return load_causal_lm(ref, dtype=dtype, device=str(device), base_model=base_model).eval()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-layer list of a causal LM (``model.model.layers`` for Llama/Mistral/Qwen...)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    num = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num:
            return module
    raise ShapeMismatchError(f"Cannot find the decoder layers of {type(model).__name__}; SparseGPT needs them.")


def _layer_prefix(model: torch.nn.Module, layers: torch.nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ShapeMismatchError("decoder layers are not a sub-module of the model")


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """``{weight tensor name: Linear}`` for every Linear inside the decoder layers."""
    layers = decoder_layers(model)
    prefix = _layer_prefix(model, layers)
    out: dict[str, torch.nn.Linear] = {}
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"{prefix}.{index}.{name}.weight"] = module
    return out


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------- gathering


class _HessianAccumulator:
    """Forward hooks that add ``x^T x`` (non-pad rows only) of each Linear's input into float32 sums."""

    def __init__(self, linears: dict[str, torch.nn.Linear], device: torch.device) -> None:
        self.linears = linears
        self.sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=device)
                     for name, m in linears.items()}
        self.counts = dict.fromkeys(linears, 0)
        self.token_mask: torch.Tensor | None = None  # [b, s] bool, set before each forward
        self._handles: list[Any] = []
        # q/k/v (and gate/up) read the very same input tensor: compute x^T x once per distinct input.
        self._memo: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def __enter__(self) -> _HessianAccumulator:  # noqa: PYI034
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._memo.clear()

    def new_batch(self, token_mask: torch.Tensor) -> None:
        self.token_mask = token_mask.bool()
        self._memo.clear()

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            x = inputs[0]
            memo = self._memo.get(id(x))
            if memo is None or memo[0] is not x:
                assert self.token_mask is not None
                rows = x.reshape(-1, x.shape[-1])[self.token_mask.reshape(-1).to(x.device)].float()  # [n, in]
                memo = (x, rows.T @ rows, rows.shape[0])
                self._memo[id(x)] = memo
            self.sums[name].add_(memo[1].to(self.sums[name].device))
            self.counts[name] += memo[2]
        return hook

    def hessians(self) -> dict[str, torch.Tensor]:
        """``H = (2/N) sum x^T x`` per Linear."""
        out = {}
        for name, total in self.sums.items():
            if self.counts[name] == 0:
                raise ModelSourceError("The calibration data has no non-pad token; give real calibration text.")
            out[name] = total.mul_(2.0 / self.counts[name])
        return out


def _batches(windows, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    ids, mask = windows.input_ids, windows.attention_mask.bool()
    for start in range(0, ids.shape[0], batch_size):
        part = mask[start : start + batch_size]
        width = int(part.sum(dim=1).max())
        yield ids[start : start + batch_size, :width], part[:, :width]


class _StopForward(Exception):
    """Raised by the layer-0 hook once that layer's inputs are captured."""


def _mixed_layer_types(model: torch.nn.Module) -> bool:
    types = getattr(model.config, "layer_types", None)
    return bool(types) and len(set(types)) > 1


def iter_layer_hessians(
    model: torch.nn.Module, windows, batch_size: int = 8, method: str = "layerwise"
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{weight name: H}`` decoder layer by decoder layer (``H``: float32 ``[in, in]``)."""
    if method not in ("layerwise", "full"):
        raise ConfigError(f"Hessian gathering `method` must be 'layerwise' or 'full', but got {method!r}.")
    device = _model_device(model)
    linears = decoder_linears(model)
    layers = decoder_layers(model)
    prefix = _layer_prefix(model, layers)
    if method == "full" or _mixed_layer_types(model):
        with torch.inference_mode(), _HessianAccumulator(linears, device) as acc:
            for ids, mask in _batches(windows, batch_size):
                acc.new_batch(mask.to(device))
                model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
            all_h = acc.hessians()
        for index in range(len(layers)):
            yield {n: h for n, h in all_h.items() if n.startswith(f"{prefix}.{index}.")}
        return

    # Layer-wise: capture the inputs of layer 0 for every batch, then walk the layers.
    captured: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]] = []

    def catch(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}, current_mask[0]))
        raise _StopForward

    current_mask: list[torch.Tensor] = [torch.empty(0)]
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids, mask in _batches(windows, batch_size):
                current_mask[0] = mask.to(device)
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if not captured:
        raise ModelSourceError("The calibration data is empty; give at least one calibration window.")

    for index, layer in enumerate(layers):
        layer_linears = {n: m for n, m in linears.items() if n.startswith(f"{prefix}.{index}.")}
        with torch.inference_mode(), _HessianAccumulator(layer_linears, device) as acc:
            for slot, (hidden, kwargs, mask) in enumerate(captured):
                acc.new_batch(mask)
                out = layer(hidden, **kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                captured[slot] = (out, kwargs, mask)  # this layer's output is the next one's input
            yield acc.hessians()


def collect_hessians(model: torch.nn.Module, windows, batch_size: int = 8,
                     method: str = "layerwise") -> dict[str, torch.Tensor]:
    """Every decoder Linear's ``H`` at once (for tests and small models)."""
    out: dict[str, torch.Tensor] = {}
    for layer_h in iter_layer_hessians(model, windows, batch_size, method):
        out.update(layer_h)
    return out


# ----------------------------------------------------------------------------------------- importance


def damped_hessian(hessian: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """``H`` with dead inputs (``H_jj = 0``) set to 1 on the diagonal and ``damp * mean(diag H)`` added."""
    h = hessian.clone().float()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(damp * float(diag.mean()))
    return h


def column_scale_from_hessian(hessian: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """``diag(U)^2`` with ``U = cholesky(H_damped^-1, upper=True)``; shape ``[in]``.

    If the Cholesky factorisation fails (``H`` numerically not positive definite), the damping is
    multiplied by 10 and retried, up to 1.0 (a warning is logged).
    """
    current = damp
    while True:
        h = damped_hessian(hessian, current)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0:
                return torch.diagonal(upper).pow(2).contiguous()
        if current >= 1.0:
            raise ModelSourceError(
                f"The Hessian is not positive definite even with damping {current}; the calibration data "
                "may be too small or the model degenerate."
            )
        logger.warning("Cholesky failed with damping %g; retrying with %g", current, current * 10)
        current *= 10


def importance_scores(delta: torch.Tensor, column_scale: torch.Tensor) -> torch.Tensor:
    """SparseGPT importance ``d^2 / diag(U)^2`` broadcast over input columns: ``[out, in]``, float32."""
    if delta.dim() != 2 or column_scale.shape != (delta.shape[1],):
        raise ShapeMismatchError(
            f"importance needs delta [out, in] and a column scale [in], but got {tuple(delta.shape)} and "
            f"{tuple(column_scale.shape)}."
        )
    return delta.float().pow(2) / column_scale.to(device=delta.device, dtype=torch.float32).unsqueeze(0)


# ----------------------------------------------------------------------------------------- cached computation


def hessian_cache_key(model_hash: str, windows_hash: str, damp: float) -> str:
    material = json.dumps({"v": HESSIAN_FORMAT_VERSION, "model": model_hash, "data": windows_hash, "damp": damp},
                          sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()


def compute_column_scales(
    model: torch.nn.Module,
    windows,
    batch_size: int = 8,
    damp: float = DEFAULT_DAMP,
    method: str = "layerwise",
    keep_hessians: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({weight name: diag(U)^2, "diagH::"+name: diag(H_damped)}, {name: H} if keep_hessians)``, CPU."""
    from tqdm.auto import tqdm

    scales: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    layers = len(decoder_layers(model))
    progress = tqdm(iter_layer_hessians(model, windows, batch_size, method), total=layers,
                    desc="hessians", unit="layer", leave=False, disable=None)
    for layer_h in progress:
        for name, h in layer_h.items():
            scales[name] = column_scale_from_hessian(h, damp).cpu()
            scales[DIAG_PREFIX + name] = torch.diagonal(damped_hessian(h, damp)).cpu().contiguous()
            if keep_hessians:
                kept[name] = h.cpu()  # undamped: consumers (obs_trim) damp it themselves
    return scales, kept


def cached_column_scales(
    model_ref: str,
    windows,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    damp: float = DEFAULT_DAMP,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    method: str = "layerwise",
    store_hessians: bool = False,
    base_model: str | None = None,
    model: torch.nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], Path]:
    """Column scales of one source model: read from the cache, or computed (model loaded, then freed)."""
    import safetensors.torch as st

    from evomerge_opt.io.atomic import atomic_write_bytes

    model_hash = state_dict_hash(model) if model is not None else model_content_hash(model_ref, base_model)
    key = hessian_cache_key(model_hash, windows.content_hash(), damp)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir("hessians")
    path = directory / f"{key}.safetensors"
    h_path = directory / f"{key}.H.safetensors"
    if path.is_file() and (not store_hessians or h_path.is_file()):
        logger.info("importance of %s from cache %s", model_ref, path.name)
        return st.load_file(str(path)), path
    owned = model is None
    if owned:
        model = load_source_model(model_ref, dtype=dtype, device=device, base_model=base_model)
    try:
        logger.info("computing Hessians of %s on %d calibration rows", model_ref, windows.num_rows)
        scales, hessians = compute_column_scales(model, windows, batch_size, damp, method, store_hessians)
    finally:
        if owned:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    meta = {"model": str(model_ref), "model_hash": model_hash, "damp": str(damp)}
    atomic_write_bytes(path, st.save(scales, metadata=meta))
    if store_hessians:
        atomic_write_bytes(h_path, st.save(hessians, metadata=meta))
    return scales, path


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


# ----------------------------------------------------------------------------------------- task vectors


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a full-model directory."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{str(path)!r} holds no .safetensors weights; task vectors need them.")
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                index[name] = file
    return index


def compute_task_vector(
    base_ref: str, finetune_ref: str, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """``x - b`` of every tensor the two checkpoints share, as float32 safetensors (cached by content).

    Full models are streamed tensor by tensor from their safetensors; a PEFT adapter is loaded merged
    onto the base (one model in memory). Tensors only in one of the two are reported and skipped.
    """
    import safetensors.torch as st
    from safetensors import safe_open

    from evomerge_opt.io.atomic import atomic_write_bytes
    from evomerge_opt.io.sources import is_peft_adapter, resolve_model_ref

    base_hash = model_content_hash(base_ref)
    ft_hash = model_content_hash(finetune_ref, base_model=base_ref)
    key = hashlib.sha256(f"tv1:{base_hash}:{ft_hash}".encode()).hexdigest()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir("task_vectors")
    path = directory / f"{key}.safetensors"
    if path.is_file():
        return path
    base_dir = Path(resolve_model_ref(base_ref))
    base_index = _checkpoint_files(base_dir)
    ft_dir = Path(resolve_model_ref(finetune_ref))
    if is_peft_adapter(ft_dir):
        model = load_source_model(str(ft_dir), dtype=torch.float32, base_model=base_ref)
        ft_tensors = {k: v.detach() for k, v in model.state_dict().items()}
        get_ft = ft_tensors.get
        ft_names = set(ft_tensors)
    else:
        ft_index = _checkpoint_files(ft_dir)
        ft_names = set(ft_index)

        def get_ft(name: str) -> torch.Tensor:
            with safe_open(str(ft_index[name]), framework="pt") as handle:
                return handle.get_tensor(name)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(base_index) & ft_names):
        with safe_open(str(base_index[name]), framework="pt") as handle:
            b = handle.get_tensor(name)
        x = get_ft(name)
        if x.shape != b.shape:
            raise ShapeMismatchError(
                f"Tensor {name!r} has shape {tuple(x.shape)} in {finetune_ref!r} but {tuple(b.shape)} in the base."
            )
        if b.is_floating_point():
            out[name] = x.float() - b.float()
    skipped = (set(base_index) ^ ft_names)
    if skipped:
        logger.warning("task vector %s: %d tensors present in only one checkpoint (skipped), e.g. %s",
                       finetune_ref, len(skipped), sorted(skipped)[:3])
    atomic_write_bytes(path, st.save(out, metadata={"base": str(base_ref), "finetune": str(finetune_ref)}))
    return path
