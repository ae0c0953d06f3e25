"""The checkpoints a PS merge reads: base + sources, opened lazily and checked against each other.

:class:`MergeSources` resolves the recipe's references (``zoo:``, paths, hub ids from the local cache,
LoRA adapter directories), opens a lazy reader per model, refuses architectures or tensor shapes that
differ (naming the tensor and both shapes), applies the ``resize_policy`` to resized vocabularies,
and hands out the float32 task vector ``d_i = x_i - b`` of any tensor. Both the streaming ``apply``
path and the resident search path are built on it.

Tied embeddings: a checkpoint saved with ``tie_word_embeddings`` has no ``lm_head.weight``; the output
follows the base (its tensor list is the base's), and a source without ``lm_head.weight`` uses its
``model.embed_tokens.weight`` in its place.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.config.recipe import PSRecipe
from evomerge_opt.errors import ConfigError, ModelSourceError, ShapeMismatchError
from evomerge_opt.io.checkpoint import StateDictReader, TensorReader, open_checkpoint
from evomerge_opt.io.safetensors_files import text_config
from evomerge_opt.io.sources import is_peft_adapter
from evomerge_opt.merge.methods import get_method

logger = logging.getLogger(__name__)

# Config fields that must agree for two checkpoints to be merged parameter by parameter.
ARCH_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "tie_word_embeddings")
TIED_HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
RESIZABLE = ("embed_tokens", "lm_head", "wte", "word_embeddings")


def local_model_dir(ref: str) -> Path:
    """A local directory for a resolved reference; hub ids come from the local HF cache (offline-safe)."""
    path = Path(ref)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelSourceError(f"Model reference {ref!r} is a file, not a model directory.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # every hub failure (offline, 404, auth) becomes one clear message
        raise ModelSourceError(
            f"Model {ref!r} is neither a local directory nor available from the Hugging Face hub/cache "
            f"({type(exc).__name__}: {exc}); check the path or download it first."
        ) from exc


def config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    from evomerge_opt.config.model_config import parse_dtype

    value = text_config(config).get("dtype") or config.get("dtype") or config.get("torch_dtype")
    try:
        return parse_dtype(value) if value else None
    except ConfigError:
        return None


class MergeSources:
    """Readers for the base (``reference``) and the participating sources of a PS recipe."""

    def __init__(self, recipe: PSRecipe, *, peft_dtype: torch.dtype = torch.float32) -> None:
        self.recipe = recipe
        method = get_method(recipe.merge_method)
        refs = [recipe.resolve_ref(m.model) for m in recipe.models]
        if recipe.base_model is not None:
            self.base_ref = recipe.resolve_ref(recipe.base_model)
        elif refs:
            self.base_ref = refs[0]  # linear without base_model: the first model is the reference
        else:
            raise ConfigError("The recipe has neither base_model nor models.")
        self.base_dir = local_model_dir(self.base_ref)
        if is_peft_adapter(self.base_dir):
            raise ModelSourceError(f"base_model {self.base_ref!r} is a LoRA/PEFT adapter; give the full base model.")
        self.base: TensorReader = open_checkpoint(self.base_dir)
        self.config: dict[str, Any] = self.base.config
        self.num_layers = int(text_config(self.config).get("num_hidden_layers") or 1)
        # recipe.models indices that take part; the base listed as a model adds nothing to a task-vector merge.
        self.indices: list[int] = []
        self.refs: list[str] = []
        self.readers: list[TensorReader] = []
        for index, ref in enumerate(refs):
            directory = local_model_dir(ref)
            if method.needs_base and recipe.base_model is not None and directory.resolve() == self.base_dir.resolve():
                logger.info("models[%d] is the base model; its task vector is zero, so it is skipped", index)
                continue
            self.indices.append(index)
            self.refs.append(ref)
            if is_peft_adapter(directory):
                self.readers.append(self._peft_reader(directory, peft_dtype))
            else:
                self.readers.append(open_checkpoint(directory))
        if not self.readers:
            raise ConfigError(
                f"merge_method {recipe.merge_method!r} needs at least one source model other than the base, "
                "but every entry of `models` is the base model."
            )
        self._check_architectures()
        self.entries = self._plan()

    # ---- opening ---------------------------------------------------------------------------------

    def _peft_reader(self, adapter_dir: Path, dtype: torch.dtype) -> TensorReader:
        """Base + LoRA adapter merged in memory (peft merge_and_unload): the one source we materialise."""
        from evomerge_opt.pool import load_peft_causal_lm

        logger.info("merging LoRA adapter %s onto %s in memory", adapter_dir, self.base_dir)
        model = load_peft_causal_lm(str(self.base_dir), str(adapter_dir), torch_dtype=dtype,
                                    is_trainable=False, merge_and_unload=True)
        state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        return StateDictReader(state, dict(self.config), str(adapter_dir))

    def _check_architectures(self) -> None:
        base = text_config(self.config)
        for ref, reader in zip(self.refs, self.readers):
            other = text_config(reader.config)
            diffs = [
                f"{key}: base {base.get(key)!r} vs {other.get(key)!r}"
                for key in ARCH_FIELDS
                if key != "tie_word_embeddings" and base.get(key) != other.get(key)
            ]
            if diffs:
                raise ShapeMismatchError(
                    f"Source {ref!r} does not share the base's architecture ({'; '.join(diffs)}); parameter-space "
                    "merges need models of one architecture and size."
                )

    def _plan(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Output tensors (the base's, in file order); checks every source has each with the same shape."""
        entries = [(name, self.base.dtype(name), self.base.shape(name)) for name in self.base.names()]
        base_names = {name for name, _, _ in entries}
        for ref, reader in zip(self.refs, self.readers):
            for name, _, shape in entries:
                if not _is_float(self.base.dtype(name)):
                    continue
                source_name = self._source_name(reader, name, ref)
                other = reader.shape(source_name)
                if tuple(other) != tuple(shape):
                    self._check_resize(name, shape, tuple(other), ref)
            extra = [n for n in reader.names() if n not in base_names and n != TIED_HEAD]
            if extra:
                logger.warning("source %s has %d tensors the base lacks (ignored), e.g. %s", ref, len(extra), extra[:3])
        return entries

    def _source_name(self, reader: TensorReader, name: str, ref: str) -> str:
        if name in reader:
            return name
        if name == TIED_HEAD and EMBED in reader:
            return EMBED  # the source ties its head to the embeddings
        raise ShapeMismatchError(
            f"Tensor {name!r} of the base is missing from source {ref!r}; the models do not share an architecture."
        )

    def _check_resize(self, name: str, base_shape: tuple[int, ...], shape: tuple[int, ...], ref: str) -> None:
        resizable = any(marker in name for marker in RESIZABLE) and len(shape) == len(base_shape) \
            and shape[1:] == base_shape[1:]
        if resizable and self.recipe.resize_policy == "truncate_to_base":
            logger.warning("tensor %s of %s has shape %s, base %s: resize_policy truncate_to_base",
                           name, ref, list(shape), list(base_shape))
            return
        hint = (" The vocabulary was resized; set `resize_policy: truncate_to_base` in the recipe to keep the "
                "base's rows (extra source rows dropped, missing ones take the base's values)." if resizable else "")
        raise ShapeMismatchError(
            f"Tensor {name!r} has shape {list(base_shape)} in the base {self.base_ref!r} but {list(shape)} in "
            f"source {ref!r}.{hint}"
        )

    # ---- reading -----------------------------------------------------------------------------------

    def read_sources(self, name: str) -> list[torch.Tensor]:
        """The stored tensors ``name`` of every participating source (CPU, stored dtype), for reading
        only (mapped from the files where possible, see :meth:`TensorReader.map_tensor`)."""
        return [reader.map_tensor(self._source_name(reader, name, ref)) for ref, reader in zip(self.refs, self.readers)]

    def align(self, source: torch.Tensor, base: torch.Tensor, position: int) -> torch.Tensor:
        """``source`` with the base's shape: under ``resize_policy: truncate_to_base`` extra rows are
        dropped and missing rows take the base's values (a zero task vector there)."""
        if source.shape == base.shape:
            return source
        dtype = torch.promote_types(source.dtype, base.dtype)
        out = base.to(dtype=dtype, copy=True)
        rows = min(source.shape[0], base.shape[0])
        out[:rows] = source[:rows].to(device=out.device, dtype=dtype)
        return out

    def delta(self, source: torch.Tensor, base32: torch.Tensor, position: int, base: torch.Tensor) -> torch.Tensor:
        """Float32 task vector ``float32(source) - float32(base)`` on ``base32``'s device."""
        aligned = self.align(source, base, position).to(base32.device)
        return torch.sub(aligned, base32) if aligned.dtype != torch.float32 else aligned - base32

    def output_dtype(self, override: str | torch.dtype | None = None) -> torch.dtype:
        from evomerge_opt.config.model_config import parse_dtype

        chosen = parse_dtype(override) if override is not None else None
        if chosen is None and self.recipe.output_dtype_name is not None:
            chosen = parse_dtype(self.recipe.output_dtype_name)
        if chosen is None:
            chosen = config_dtype(self.config)
        if chosen is None:
            floats = [dtype for _, dtype, _ in self.entries if _is_float(dtype)]
            chosen = max(set(floats), key=floats.count) if floats else torch.float32
        return chosen

    def close(self) -> None:
        self.base.close()
        for reader in self.readers:
            reader.close()


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point

