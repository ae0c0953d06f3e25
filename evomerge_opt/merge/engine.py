"""The ``apply`` path: merge a PS recipe tensor by tensor from the sources' safetensors to a HF directory.

``stream_merge`` never holds a whole model: workers (forked processes or threads, see
:func:`_merge_all`) each take one output tensor at a time, map it from the base and every source,
merge it in float32 on ``device``, cast it to the output dtype in a buffer they reuse, check it is
finite and write it at its pre-planned offset in the output shard (see :mod:`evomerge_opt.io.writer`). Peak memory is therefore a few tensors, whatever the model
size. Everything is written inside an :func:`~evomerge_opt.io.atomic.atomic_output_dir` staging
directory, so a failure (bad shapes, NaN, Ctrl-C) leaves no half-written output.

The in-memory path for the search is :class:`~evomerge_opt.merge.resident.ResidentMerger` (re-exported
here); both use :class:`~evomerge_opt.merge.params.RecipeParams` and agree tensor for tensor.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.config.recipe import PSRecipe, load_recipe
from evomerge_opt.config.yamlio import dump_yaml
from evomerge_opt.errors import ConfigError
from evomerge_opt.io.atomic import atomic_output_dir
from evomerge_opt.io.model_card import copy_tokenizer, write_config, write_generation_config, write_model_card
from evomerge_opt.io.writer import PlannedShardWriter
from evomerge_opt.merge._base import ImportanceProvider
from evomerge_opt.merge.methods import StreamInputs
from evomerge_opt.merge.params import RecipeParams
from evomerge_opt.merge.sources import MergeSources, local_model_dir
from evomerge_opt.merge.sparsify.importance import importance_from_recipe
from evomerge_opt.merge.topk import TopK

logger = logging.getLogger(__name__)

RECIPE_FILE = "evomerge_recipe.yml"  # the recipe beside the weights (same name as DFS outputs)

def as_ps_recipe(recipe: str | os.PathLike[str] | dict[str, Any] | PSRecipe) -> PSRecipe:
    parsed = load_recipe(recipe)
    if not isinstance(parsed, PSRecipe):
        raise ConfigError(
            f"Expected a parameter-space recipe (with `merge_method`), but got a {type(parsed).__name__}; "
            "data-flow-space recipes are applied by evomerge_opt.dfs.api."
        )
    return parsed


def stream_merge(
    recipe: str | os.PathLike[str] | dict[str, Any] | PSRecipe,
    out_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    importance: ImportanceProvider | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    workers: int | None = None,
    known_topk: Mapping[tuple[str, int], TopK] | None = None,
) -> Path:
    """Merge ``recipe`` into the HF model directory ``out_dir``; returns its path.

    ``dtype`` overrides the recipe's output dtype (default: the base's). ``importance`` is needed
    only for ``parameters.sparsify: sparsegpt``. ``workers`` tensors are merged concurrently
    (default :func:`default_workers`). ``known_topk``: magnitude top-k selections computed ahead,
    keyed by (tensor name, index in ``recipe.models``) (see :mod:`evomerge_opt.merge.prepass`).
    """
    recipe = as_ps_recipe(recipe)
    out_dir = Path(out_dir)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available; use --device cpu.")
    if importance is None:
        importance = importance_from_recipe(recipe, device=dev)  # None unless it uses sparsify: sparsegpt
    sources = MergeSources(recipe)
    try:
        out_dtype = sources.output_dtype(dtype)
        params = RecipeParams(recipe, sources.num_layers, importance, sources.indices)
        plan = [(name, out_dtype if dt.is_floating_point else dt, shape) for name, dt, shape in sources.entries]
        with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
            writer = PlannedShardWriter(staging, plan, max_shard_size, metadata={"merged_by": "evo-merge"})
            try:
                task = _TensorMerger(sources, params, writer, dev, out_dtype, known_topk or {})
                _merge_all(task, progress, workers or default_workers(dev))
                files = writer.finish()
            finally:
                writer.close()
            _write_metadata(staging, recipe, sources, out_dtype)
        logger.info("wrote %d tensors in %d file(s) to %s", len(plan), len(files), out_dir)
        return out_dir
    finally:
        sources.close()


def default_workers(device: torch.device) -> int:
    """Tensors merged concurrently: on CPU one per thread torch may use (its default is one per core;
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` lower it), at most 4; one on a GPU."""
    return 1 if device.type != "cpu" else max(1, min(4, torch.get_num_threads(), os.cpu_count() or 1))


class ByteBuffer:
    """A grow-only byte buffer reused for one thread's merged tensors instead of a fresh one each:
    a fresh buffer costs a page fault per 4 KB on first touch. What is built in it is valid until
    the buffer is used again."""

    def __init__(self) -> None:
        self._data = torch.empty(0, dtype=torch.uint8)

    def tensor(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``dtype`` tensor of ``shape`` in the buffer (grown when too small)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self._data.numel() < nbytes:
            self._data = torch.empty(0, dtype=torch.uint8)  # free the old one before the bigger one
            self._data = torch.empty(nbytes, dtype=torch.uint8)
        return self._data[:nbytes].view(dtype).reshape(shape)


class _TensorMerger:
    """Reads, merges and writes one output tensor by name: the task of a merge worker."""

    def __init__(self, sources: MergeSources, params: RecipeParams, writer: PlannedShardWriter,
                 device: torch.device, out_dtype: torch.dtype, known_topk: Mapping[tuple[str, int], TopK]) -> None:
        self.sources, self.params, self.writer = sources, params, writer
        self.device, self.out_dtype, self.known_topk = device, out_dtype, known_topk
        self._local = threading.local()  # each worker merges into its own reusable output buffer

    def __call__(self, name: str) -> str:
        sources, device = self.sources, self.device
        base = sources.base.map_tensor(name)
        if not base.is_floating_point():
            self.writer.write(name, base)  # integer buffers are copied from the base
            return name
        originals = sources.read_sources(name)
        base = base.to(device, non_blocking=True)
        originals = [sources.align(x, base, j).to(device, non_blocking=True) for j, x in enumerate(originals)]
        if device.type == "cpu":
            if not hasattr(self._local, "out"):
                self._local.out = ByteBuffer()
            out = self._local.out.tensor(base.shape, self.out_dtype)
        else:  # the CUDA caching allocator already reuses device memory
            out = torch.empty(base.shape, dtype=self.out_dtype, device=device)
        known = [self.known_topk.get((name, index)) for index in sources.indices] if self.known_topk else None
        self.writer.write(name, self.params.merge_into(name, StreamInputs(base, originals, known), out))
        return name


# Merge jobs of forked worker processes: a child inherits this table (and every open reader, the
# writer's files and the recipe) at fork, so a task is just (job, tensor name).
_FORKED_JOBS: dict[int, _TensorMerger] = {}


def _run_forked(job: int, name: str) -> str:
    return _FORKED_JOBS[job](name)


def use_processes(device: torch.device, workers: int) -> bool:
    """Whether CPU workers are forked processes rather than threads: on Linux, when nothing else
    runs in this process (forking a multi-threaded process can deadlock the child)."""
    return (device.type == "cpu" and workers > 1 and sys.platform == "linux"
            and threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods())


def _merge_all(task: _TensorMerger, progress: bool, workers: int) -> None:
    """Read, merge and write every tensor on ``workers`` workers, each taking whole tensors.

    A worker writes the tensor it merged itself (the writer puts every tensor at its planned offset,
    so the order does not matter) and starts on the next, so nothing waits for a slow neighbour; the
    largest tensors go first so the last ones to finish are small (the embeddings are a fifth of a
    small model: started last, one worker would merge them alone). Each worker holds one tensor (its
    mapped inputs and its output) at a time. On CPU the workers are forked processes where
    :func:`use_processes` allows (a merge is ~30 short kernels per chunk, and threads hand the GIL
    back and forth between them: two threads ran 1.35x faster than one, two processes 1.7x), else
    threads. Either runs torch with one intra-op thread: chunk-sized kernels gain nothing from more,
    and OpenMP's spinning barriers make them collapse on a busy machine.
    """
    # Largest first; the sort is stable, so equal sizes keep the checkpoint's order.
    names = [name for name, _, _ in sorted(task.sources.entries, key=lambda entry: -math.prod(entry[2]))]
    device, writer = task.device, task.writer
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # before any fork: the children inherit it
    job = id(task)
    pool: Executor
    if use_processes(device, workers):
        _FORKED_JOBS[job] = task
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        futures = [pool.submit(_run_forked, job, name) for name in names]  # forks the workers
    else:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="evomerge-merge")
        futures = [pool.submit(task, name) for name in names]
    bar = None
    try:
        if progress:  # after the fork (tqdm may start a monitor thread)
            from tqdm.auto import tqdm

            bar = tqdm(total=len(names), desc="merging", unit="tensor")
        for future in as_completed(futures):
            writer.mark_written(future.result())  # the first failure (bad shapes, NaN) stops the merge
            if bar is not None:
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure: drop queued tensors, finish running ones
        _FORKED_JOBS.pop(job, None)
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()


def _write_metadata(out_dir: Path, recipe: PSRecipe, sources: MergeSources, dtype: torch.dtype) -> None:
    write_config(out_dir, sources.config, dtype)
    write_generation_config(out_dir, sources.base_dir, sources.config)
    tokenizer_ref = recipe.tokenizer_source
    tokenizer_dir = sources.base_dir if tokenizer_ref in (None, "base") else local_model_dir(recipe.resolve_ref(tokenizer_ref))
    if not copy_tokenizer(tokenizer_dir, out_dir):
        logger.warning("no tokenizer files found in %s; the output has no tokenizer", tokenizer_dir)
    recipe_yaml = dump_yaml(recipe.to_dict())
    (out_dir / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")  # inside the atomic staging dir
    write_model_card(
        out_dir, recipe_yaml, base_model=recipe.base_model, sources=sources.refs,
        method=recipe.merge_method, dtype=dtype, provenance=recipe.provenance,
    )


def __getattr__(name: str) -> Any:
    if name == "ResidentMerger":  # lazily, to keep the import graph acyclic
        from evomerge_opt.merge.resident import ResidentMerger

        return ResidentMerger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
