"""Gathering Hessians of every decoder Linear's input over calibration tokens, layer by layer.

For a Linear with input ``X`` (rows = the calibration tokens that are not padding, ``N`` of them),
``H = (2/N) * sum_t x_t^T x_t`` ``[in, in]`` (float32).

``method="layerwise"`` (the default): the calibration batches run through the embeddings once (a hook
stops the forward at decoder layer 0 and keeps that layer's inputs and keyword arguments: causal
mask, rotary position embeddings, position ids); then each decoder layer in turn runs on the kept
hidden states with forward hooks on its Linears, and its outputs become the next layer's inputs.
Memory is one layer's activations for the calibration set plus one layer's Hessians; only the
``[in]``-sized column scales are kept (:func:`compute_column_scales`). ``method="full"`` hooks every
Linear and runs the whole model batch by batch (memory: every Hessian at once); it is the reference
the tests compare against and the path for architectures whose layers need different masks (mixed
``layer_types``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from evomerge_opt.errors import ConfigError, ModelSourceError
from evomerge_opt.merge.sparsify.importance.layers import (
    decoder_layers,
    decoder_linears,
    layer_prefix,
    model_device,
)
from evomerge_opt.merge.sparsify.importance.scores import (
    DEFAULT_DAMP,
    DIAG_PREFIX,
    column_scale_from_hessian,
    damped_hessian,
)


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
    device = model_device(model)
    linears = decoder_linears(model)
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
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
