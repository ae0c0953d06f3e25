"""Non-strict loading of a checkpoint into a constructed model (``--load-from-checkpoint``).

Accepted checkpoints: a ``.safetensors`` file; a directory with ``model.safetensors.index.json``
(sharded), ``model.safetensors``, other ``*.safetensors`` files, ``pytorch_model.bin.index.json`` or
``pytorch_model.bin``; a ``.bin``/``.pt``/``.pth`` file. Torch pickles are read with
``weights_only=True`` only.

Every tensor of the checkpoint whose name and shape match a parameter or persistent buffer of the
model is copied into it (cast to the model's dtype, on the model's device); the rest is reported:
``missing`` (model tensors the checkpoint lacks), ``unexpected`` (checkpoint tensors the model has no
slot for) and ``mismatched`` (same name, other shape). Tied weights are one tensor under several
names: any of the names in the checkpoint fills it, and the other names are neither missing nor
unexpected.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evomerge_opt.errors import ConfigError, ModelSourceError

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"loaded {len(self.loaded)} tensors from {self.path}"]
        if self.missing:
            out.append(f"WARNING: {len(self.missing)} model parameters/buffers not found in the checkpoint "
                       f"(left as constructed): {', '.join(self.missing)}")
        if self.unexpected:
            out.append(f"WARNING: {len(self.unexpected)} unexpected checkpoint tensors (ignored): "
                       f"{', '.join(self.unexpected)}")
        for name, want, got in self.mismatched:
            out.append(f"WARNING: shape mismatch for {name}: model {list(want)}, checkpoint {list(got)} (skipped)")
        return out


def _checkpoint_files(path: Path) -> list[Path]:
    """The weight files of ``path`` (a file or a model/checkpoint directory), in load order."""
    if path.is_file():
        if path.suffix == ".safetensors" or path.suffix in TORCH_SUFFIXES:
            return [path]
        if path.name.endswith(".index.json"):
            return _from_index(path)
        raise ModelSourceError(
            f"Checkpoint {str(path)!r} is neither a .safetensors file, a torch file ({', '.join(TORCH_SUFFIXES)}) "
            "nor a *.index.json; pass a weights file or a model directory."
        )
    if not path.is_dir():
        raise ModelSourceError(f"Checkpoint {str(path)!r} does not exist; check --load-from-checkpoint.")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            return _from_index(path / index)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    files = sorted(path.glob("*.safetensors")) or sorted(p for s in TORCH_SUFFIXES for p in path.glob(f"*{s}"))
    if not files:
        raise ModelSourceError(
            f"Checkpoint directory {str(path)!r} holds no weights (*.safetensors, pytorch_model*.bin or an index)."
        )
    return files


def _from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelSourceError(f"{str(index)!r} is not a valid checkpoint index: {exc!r}") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [str(f.name) for f in files if not f.is_file()]
    if absent:
        raise ModelSourceError(f"Shards listed in {str(index)!r} are missing: {', '.join(absent)}.")
    return files


def iter_checkpoint(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor in the checkpoint, one file at a time (CPU tensors)."""
    from safetensors import safe_open

    for file in _checkpoint_files(Path(path)):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                    yield name, handle.get_tensor(name)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ModelSourceError(
                    f"Could not read {str(file)!r} with torch.load(weights_only=True): {exc}"
                ) from exc
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ModelSourceError(f"{str(file)!r} does not hold a state dict (got {type(state).__name__}).")
            for name, tensor in state.items():
                if isinstance(tensor, torch.Tensor):
                    yield name, tensor


def _tensor_groups(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical name -> tensor for parameters and persistent buffers, and alias -> canonical name.

    Tied weights appear under several state-dict names but are one tensor; the first name is canonical.
    """
    canonical: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    by_id: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in by_id:
            alias[name] = by_id[key]
        else:
            by_id[key] = name
            canonical[name] = tensor
            alias[name] = name
    return canonical, alias


def load_checkpoint_non_strict(model: torch.nn.Module, path: str | os.PathLike[str]) -> LoadReport:
    """Copy the matching tensors of checkpoint ``path`` into ``model`` in place; report the rest."""
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "meta":
        raise ConfigError(
            "--load-from-checkpoint needs a real device: the model is on 'meta' (no storage to load into); "
            "pass --device cpu (or cuda)."
        )
    canonical, alias = _tensor_groups(model)
    report = LoadReport(path=str(path))
    filled: dict[str, str] = {}  # canonical name -> checkpoint name it was filled from
    with torch.no_grad():
        for name, tensor in iter_checkpoint(path):
            target_name = alias.get(name)
            if target_name is None:
                report.unexpected.append(name)
                continue
            # A tied tensor is filled from its canonical name when the checkpoint has it (whatever the
            # file order), else from the first alias found.
            if target_name in filled and (name != target_name or filled[target_name] == target_name):
                logger.info("checkpoint tensor %s is a tied alias of %s (filled from %s); ignored",
                            name, target_name, filled[target_name])
                continue
            target = canonical[target_name]
            if tuple(target.shape) != tuple(tensor.shape):
                report.mismatched.append((name, tuple(target.shape), tuple(tensor.shape)))
                continue
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            if target_name in filled:
                report.loaded.remove(filled[target_name])
            filled[target_name] = name
            report.loaded.append(name)
    mismatched = {alias[n] for n, _, _ in report.mismatched}
    report.missing = [n for n in canonical if n not in filled and n not in mismatched]
    for line in report.lines()[1:]:
        logger.warning("%s", line)
    return report
