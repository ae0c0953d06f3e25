"""Streaming ``evo-merge apply`` of DFS and PS+DFS recipes: tensor by tensor, no model instantiated.

:func:`stream_dfs_apply` writes the same directory as the in-memory path
(:func:`evomerge_opt.dfs.api.dfs_merge_from_config` + :func:`evomerge_opt.dfs.save.save_dfs_model`:
the same tensors, config, generation config, tokenizer, modeling file, recipe and card; tested tensor
for tensor), in either format:

* ``evo``: every physical layer once (``model.layers.{p}``), the hops' scale/bias tensors
  (``model.hops.{t}``), ``auto_map`` and the portable ``modeling_evo_affine.py``;
* ``plain``: one standard decoder layer per hop (``model.layers.{t}``), the running product of the
  hops' scalar scales folded into each copy's ``o_proj`` / ``down_proj`` (:mod:`evomerge_opt.dfs.plain`).

Each output tensor is read from its source's checkpoint (mapped, :meth:`TensorReader.map_tensor`),
renamed, cast (and folded), and written at its planned offset in the output shards
(:class:`~evomerge_opt.io.writer.PlannedShardWriter`); the mapped pages are released when the tensor is
freed. An inline parameter-space source (PS+DFS) is never built as a model: each tensor it supplies is
merged on demand by :func:`merge_ps_tensor` from the PS recipe's base and sources, exactly as
:func:`~evomerge_opt.merge.engine.stream_merge` merges it. Peak memory is therefore a few tensors
(the largest is usually the embedding matrix), whatever the model size.

Sources that are not local safetensors/bin checkpoints in the recipe's head type (a PEFT adapter, a
hub model pinned to a revision, a checkpoint loaded as another head via ``task:``) are loaded as today's
path loads them (one model, held until the output is written) and read from memory: the output is the
same, only the memory bound does not hold for them.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.config.dfs_recipe import DFSRecipe, DFSSource, load_dfs_recipe
from evomerge_opt.config.model_config import dtype_name, parse_dtype
from evomerge_opt.config.yamlio import dump_yaml
from evomerge_opt.dfs import plain as plain_format
from evomerge_opt.dfs.api import _load_source, _load_tokenizer
from evomerge_opt.dfs.build import WRAPPERS, _factor_tensor, check_source_configs, evo_config_for
from evomerge_opt.dfs.save import MODELING_FILE, RECIPE_FILE, auto_map_for, model_card
from evomerge_opt.errors import ConfigError, ModelSourceError
from evomerge_opt.io.atomic import atomic_output_dir, atomic_write_text
from evomerge_opt.io.checkpoint import StateDictReader, TensorReader, open_checkpoint
from evomerge_opt.io.writer import PlannedShardWriter

logger = logging.getLogger(__name__)

EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


# ---- the one place that knows how the merge engine merges a tensor ------------------------------------

def merge_ps_tensor(sources: Any, params: Any, name: str, out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Tensor ``name`` of an inline PS recipe's merge (CPU, ``out_dtype``), computed as ``stream_merge``
    computes it (``merge.engine._TensorMerger``): the base's and sources' stored tensors, aligned to the
    base's shape, merged in float32 by ``RecipeParams.merge_into`` over ``StreamInputs``.

    ``sources`` is a ``merge.sources.MergeSources``, ``params`` a ``merge.params.RecipeParams``. This
    function (and :class:`_MergedPSReader`, which builds both) is the only code here that depends on
    the merge engine's internals.
    """
    from evomerge_opt.merge.methods import StreamInputs

    base = sources.base.map_tensor(name)
    if not base.is_floating_point():
        return base.clone()  # integer buffers are copied from the base, as stream_merge does
    originals = sources.read_sources(name)
    base = base.to(device)
    originals = [sources.align(x, base, j).to(device) for j, x in enumerate(originals)]
    out = torch.empty(base.shape, dtype=out_dtype, device=device)
    return params.merge_into(name, StreamInputs(base, originals), out).to("cpu")


class _MergedPSReader(TensorReader):
    """The reader interface over an inline PS recipe's merged model: each tensor merged when read."""

    def __init__(self, ps_recipe: Any, device: torch.device, dtype: torch.dtype | None) -> None:
        from evomerge_opt.merge.params import RecipeParams
        from evomerge_opt.merge.sources import MergeSources
        from evomerge_opt.merge.sparsify.importance import importance_from_recipe

        self.recipe = ps_recipe
        self.device = device
        self.sources = MergeSources(ps_recipe)
        # The dtype `merge_recipe(ps, dtype=...)` builds the resident model in.
        self.out_dtype = self.sources.output_dtype(dtype)
        importance = importance_from_recipe(ps_recipe, device=device)  # None unless sparsify: sparsegpt
        self.params = RecipeParams(ps_recipe, self.sources.num_layers, importance, self.sources.indices)
        self.path = str(self.sources.base_dir)
        self.config = self.sources.config
        self._entries = {name: (dt, shape) for name, dt, shape in self.sources.entries}

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1])

    def dtype(self, name: str) -> torch.dtype:
        stored = self._entries[name][0]
        return self.out_dtype if stored.is_floating_point else stored

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise ModelSourceError(f"Tensor {name!r} is not in the merged model of base {self.path!r}.")
        return merge_ps_tensor(self.sources, self.params, name, self.out_dtype, self.device)

    def close(self) -> None:
        self.sources.close()


# ---- sources -----------------------------------------------------------------------------------------

@dataclass
class _Source:
    reader: TensorReader
    config: Any  # transformers config
    directory: Path | None  # where its generation_config.json lives (None: `generation_config` given)
    tokenizer_ref: str
    dtype: torch.dtype  # the dtype today's in-memory path holds this source in
    task: str
    generation_config: Any = None


def _checkpoint_dtype(config: Any, reader: TensorReader) -> torch.dtype:
    """The dtype ``from_pretrained`` without ``dtype=`` loads a checkpoint in: the config's, else the
    most common floating dtype of its tensors."""
    from evomerge_opt.merge.sources import config_dtype

    dtype = config_dtype(config.to_dict())
    if dtype is not None:
        return dtype
    floats = [reader.dtype(n) for n in reader.names() if reader.dtype(n).is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _config_task(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    return "sequence_classification" if any(str(a).endswith("ForSequenceClassification") for a in archs) else "causal_lm"


def _open_source(recipe: DFSRecipe, index: int, source: DFSSource, device: torch.device,
                 load_dtype: torch.dtype | None) -> _Source:
    from transformers import AutoConfig

    if source.ps_recipe is not None:
        from evomerge_opt.config.recipe import parse_ps_recipe

        ps = parse_ps_recipe(source.ps_recipe, "model_paths entry (inline parameter-space recipe)", recipe._source_dir)
        reader = _MergedPSReader(ps, device, load_dtype)
        tokenizer_ref = ps.tokenizer_source if ps.tokenizer_source not in (None, "base") else (
            ps.base_model or ps.models[0].model
        )
        config = AutoConfig.from_pretrained(reader.path)
        return _Source(reader, config, Path(reader.path), ps.resolve_ref(tokenizer_ref), reader.out_dtype, "causal_lm")
    from evomerge_opt.io.sources import is_peft_adapter

    path = recipe.resolve_ref(source.path)
    local = Path(path).is_dir() and source.revision is None and not is_peft_adapter(path)
    if local:
        config = AutoConfig.from_pretrained(path)
        task = _config_task(config)
        if recipe.task in ("auto", task):
            reader = open_checkpoint(path)
            dtype = load_dtype if load_dtype is not None else _checkpoint_dtype(config, reader)
            return _Source(reader, config, Path(path), path, dtype, task)
    # Not a local checkpoint of the wanted head: load it as today's path does, and read it from memory.
    from evomerge_opt.dfs.build import source_task

    logger.info("model_paths[%d] %s is loaded in memory (not a local checkpoint of the recipe's head type); "
                "the others are streamed", index, source.name)
    model, tokenizer_ref = _load_source(recipe, source, "cpu", load_dtype, recipe.task)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    reader = StateDictReader(state, model.config.to_dict(), path)
    return _Source(reader, model.config, None, tokenizer_ref, next(model.parameters()).dtype, source_task(model),
                   getattr(model, "generation_config", None))


# ---- planning ----------------------------------------------------------------------------------------

@dataclass
class _Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def _layer_tensors(reader: TensorReader, layer: int) -> list[tuple[str, str]]:
    """``(name in the source, name inside the layer)`` of decoder layer ``layer``'s stored tensors."""
    prefix = f"model.layers.{layer}."
    return [(name, name[len(prefix):]) for name in reader.names()
            if name.startswith(prefix) and not name.endswith("rotary_emb.inv_freq")]  # a buffer, never saved


class _Planner:
    def __init__(self, sources: list[_Source], common: torch.dtype, save: torch.dtype) -> None:
        self.sources, self.common, self.save = sources, common, save
        self.entries: list[_Planned] = []

    def _out_dtype(self, stored: torch.dtype) -> torch.dtype:
        return self.save if stored.is_floating_point else stored

    def copy(self, out_name: str, m: int, name: str, multiply_by: float | None = None) -> None:
        reader = self.sources[m].reader
        stored = reader.dtype(name)
        common, save = self.common, self.save

        def produce() -> torch.Tensor:
            tensor = reader.map_tensor(name)
            if not tensor.is_floating_point():
                return tensor
            # Exactly the casts of the in-memory path: the sources in their (common) load dtype, the
            # saved copy in the output dtype; a folded tensor is scaled in float32 before the cast.
            tensor = tensor.to(common)
            if multiply_by is not None:
                tensor = torch.mul(tensor.to(torch.float32), multiply_by)
            return tensor.to(save)

        self.entries.append(_Planned(out_name, self._out_dtype(stored), tuple(reader.shape(name)), produce))

    def value(self, out_name: str, tensor: torch.Tensor) -> None:
        save = self.save
        self.entries.append(_Planned(out_name, save, tuple(tensor.shape), lambda: tensor.to(save)))


def _head_name(source: _Source, task: str) -> list[str]:
    if task == "sequence_classification":
        return [n for n in ("score.weight", "score.bias") if n in source.reader]
    return [LM_HEAD if LM_HEAD in source.reader else EMBED]  # a tied source's head is its embedding


def _plan_evo(planner: _Planner, recipe: DFSRecipe, config: Any, hop_factors: list[tuple], task: str) -> None:
    sources = planner.sources
    planner.copy(EMBED, recipe.input_layer_model, EMBED)
    for p, (m, l) in enumerate(config.physical_layers):
        for name, inner in _layer_tensors(sources[m].reader, l):
            planner.copy(f"model.layers.{p}.{inner}", m, name)
    for t, (scale, bias) in enumerate(hop_factors):
        if scale is not None:
            planner.value(f"model.hops.{t}.scale", scale)
        if bias is not None:
            planner.value(f"model.hops.{t}.bias", bias)
    out = recipe.output_layer_model
    planner.copy(NORM, out, NORM)
    if task == "sequence_classification":
        for name in _head_name(sources[out], task):
            planner.copy(name, out, name)
    elif not config.tie_word_embeddings:
        planner.copy(LM_HEAD, out, _head_name(sources[out], task)[0])


def _plan_plain(planner: _Planner, recipe: DFSRecipe, config: Any, task: str) -> None:
    """One layer per hop; ``plain.fold_factors`` gives what each tensor is multiplied by (None: copied)."""
    sources = planner.sources
    # The scales as the DFS model holds them: in the sources' (common) dtype, like its hop tensors.
    folds = plain_format.fold_factors(recipe, tied=bool(config.tie_word_embeddings), dtype=planner.common)
    planner.copy(EMBED, recipe.input_layer_model, EMBED, multiply_by=folds.embedding)
    for t, (_, m, l) in enumerate(recipe.hops()):
        for name, inner in _layer_tensors(sources[m].reader, l):
            planner.copy(f"model.layers.{t}.{inner}", m, name,
                         multiply_by=folds.layers[t] if plain_format.is_folded(inner) else None)
    out = recipe.output_layer_model
    planner.copy(NORM, out, NORM, multiply_by=folds.final_norm)
    if task == "sequence_classification":
        for name in _head_name(sources[out], task):
            planner.copy(name, out, name)
    elif not config.tie_word_embeddings:
        planner.copy(LM_HEAD, out, _head_name(sources[out], task)[0])


# ---- metadata ----------------------------------------------------------------------------------------

def _generation_config(source: _Source) -> Any:
    """The input model's generation config, as ``from_pretrained`` gives it to today's path."""
    from transformers import GenerationConfig

    if source.generation_config is not None:
        return source.generation_config
    if source.directory is not None and (source.directory / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source.directory)
    return GenerationConfig.from_model_config(source.config)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output before any source is opened (atomic_output_dir checks again at the end)."""
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (CLI: --overwrite) to replace it.")


def stream_dfs_apply(
    recipe: str | os.PathLike[str] | dict[str, Any] | DFSRecipe,
    out_dir: str | os.PathLike[str],
    *,
    format: str = "evo",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    load_dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
) -> Path:
    """Write ``recipe``'s DFS model to ``out_dir`` in ``format`` (``evo`` | ``plain``); return the path.

    ``dtype``: saved dtype (default the recipe's ``dtype``, else bfloat16); ``load_dtype``: the dtype the
    sources are taken in before that cast (default: each checkpoint's, float32 when they differ), as in
    :func:`evomerge_opt.dfs.api.dfs_merge_from_config`. ``device`` is where inline PS sources are merged.
    A recipe ``--format plain`` cannot express raises :class:`ConfigError` before anything is read.
    """
    recipe = load_dfs_recipe(recipe)
    if format not in plain_format.FORMATS:
        raise ConfigError(f"Unknown DFS output format {format!r}; valid formats are {', '.join(plain_format.FORMATS)}.")
    if format == "plain":
        plain_format.check_plain_recipe(recipe)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    save_dtype = parse_dtype(dtype if dtype is not None else recipe.output_dtype_name())
    loaded_dtype = parse_dtype(load_dtype) if isinstance(load_dtype, str) else load_dtype
    dev = torch.device(device)
    sources: list[_Source] = []
    try:
        for index, source in enumerate(recipe.sources):
            sources.append(_open_source(recipe, index, source, dev, loaded_dtype))
        configs = [s.config for s in sources]
        family, task = check_source_configs(configs, [s.task for s in sources], recipe)
        dtypes = {s.dtype for s in sources}
        common = next(iter(dtypes))
        if len(dtypes) > 1:
            logger.warning("DFS sources have different dtypes %s; casting all to float32", sorted(map(str, dtypes)))
            common = torch.float32
        hidden = configs[0].hidden_size
        hop_factors, scale_kinds, bias_kinds = [], [], []
        for r, m, l in recipe.hops():  # factor sizes checked before anything is written
            scale_kind, scale = _factor_tensor(recipe.scale_at(r, m, l), f"scaling_factors[{r}][{m}][{l}]", hidden,
                                               common, torch.device("cpu"))
            bias_kind, bias = _factor_tensor(recipe.bias_at(r, m, l), f"bias_factors[{r}][{m}][{l}]", hidden,
                                             common, torch.device("cpu"))
            hop_factors.append((scale, bias))
            scale_kinds.append(scale_kind)
            bias_kinds.append(bias_kind)
        planner = _Planner(sources, common, save_dtype)
        if format == "plain":
            plain_format.check_plain_layers(configs, recipe)
            config = plain_format.plain_config(configs, recipe, family, task, dtype_name(save_dtype))
            _plan_plain(planner, recipe, config, task)
            class_name = config.architectures[0]
        else:
            config = copy.deepcopy(evo_config_for(configs, recipe, family, task, scale_kinds, bias_kinds))
            model_cls = WRAPPERS[(family, task)][1]
            class_name = model_cls.__name__
            config.dtype = dtype_name(save_dtype)
            config.architectures = [class_name]
            config.auto_map = auto_map_for(model_cls)
            _plan_evo(planner, recipe, config, hop_factors, task)
        tokenizer = _output_tokenizer(recipe, sources)
        generation = _generation_config(sources[recipe.input_layer_model]) if task == "causal_lm" else None
        recipe_yaml = dump_yaml(recipe.to_dict())
        _write(out_dir, overwrite, planner.entries, max_shard_size, progress, config, generation, tokenizer,
               recipe_yaml, class_name, format)
    finally:
        for source in sources:
            source.reader.close()
    logger.info("wrote DFS model (%s, %s, %s format) to %s", class_name, dtype_name(save_dtype), format, out_dir)
    return out_dir


def _output_tokenizer(recipe: DFSRecipe, sources: list[_Source]) -> Any:
    """The input model's tokenizer, loaded as today's path loads it (None, with a warning, if it has none)."""

    ref = sources[recipe.input_layer_model].tokenizer_ref
    try:
        return _load_tokenizer(ref, recipe.sources[recipe.input_layer_model].revision)
    except (ModelSourceError, OSError, ValueError) as exc:
        logger.warning(
            "no tokenizer could be loaded from input_layer_model's source %r (%s); the output has no tokenizer "
            "files, copy them from the source you tokenize with", ref, exc,
        )
        return None


def _write(out_dir: Path, overwrite: bool, entries: list[_Planned], max_shard_size: str | int, progress: bool,
           config: Any, generation: Any, tokenizer: Any, recipe_yaml: str, class_name: str, format: str) -> None:
    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        plan = [(e.name, e.dtype, e.shape) for e in entries]
        writer = PlannedShardWriter(staging, plan, max_shard_size, metadata={"format": "pt"})
        try:
            iterator: Any = entries
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(entries, desc=f"writing ({format})", unit="tensor")
            for entry in iterator:
                writer.write(entry.name, entry.produce())  # one tensor in memory at a time
            writer.finish()
        finally:
            writer.close()
        config.save_pretrained(staging)
        if format == "plain":
            plain_format.add_legacy_rope_keys(staging / "config.json")
        else:
            from evomerge_opt.dfs import modeling_evo_affine as evo

            shutil.copy2(Path(evo.__file__), staging / MODELING_FILE)
        if generation is not None:
            generation.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_write_text(staging / RECIPE_FILE, recipe_yaml)
        atomic_write_text(staging / "README.md", model_card(config, class_name, recipe_yaml, plain=format == "plain"))


def apply_dfs_recipe(
    recipe: str | os.PathLike[str] | dict[str, Any] | DFSRecipe,
    out_dir: str | os.PathLike[str],
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    load_dtype: str | torch.dtype | None = None,
    *,
    format: str = "evo",
    max_shard_size: str | int = "5GB",
    progress: bool = False,
) -> Path:
    """``evo-merge apply`` for a DFS recipe: write the directory (``format`` evo | plain); return its path.

    Streams tensor by tensor from the sources' checkpoints (:func:`stream_dfs_apply`; no model is
    built). ``dtype`` is the saved dtype (default: the recipe's ``dtype``, else bfloat16).
    """
    return stream_dfs_apply(recipe, out_dir, format=format, device=device, dtype=dtype, overwrite=overwrite,
                            load_dtype=load_dtype, max_shard_size=max_shard_size, progress=progress)
