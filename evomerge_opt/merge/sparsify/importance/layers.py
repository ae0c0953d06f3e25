"""Model access for calibration: load a source model, find its decoder layers and their Linears."""

from __future__ import annotations

import torch

from evomerge_opt.errors import ShapeMismatchError


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


def layer_prefix(model: torch.nn.Module, layers: torch.nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ShapeMismatchError("decoder layers are not a sub-module of the model")


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """``{weight tensor name: Linear}`` for every Linear inside the decoder layers."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    out: dict[str, torch.nn.Linear] = {}
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"{prefix}.{index}.{name}.weight"] = module
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
