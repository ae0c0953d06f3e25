"""The `apply` fast path: numpy top-k pre-pass, forked merge workers, mapped reads, torch-free recipes.

The pre-pass must give exactly the trimming the merge would compute itself (so the output is byte for
byte the same), the forked workers must write the same file as threads and report a failure like them.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge_opt.config.names import METHOD_NAMES
from evomerge_opt.config.recipe import load_recipe
from evomerge_opt.config.yamlio import save_yaml
from evomerge_opt.errors import ModelSourceError, NonFiniteResultError
from evomerge_opt.io.checkpoint import CheckpointReader
from evomerge_opt.merge import engine, prepass, topk
from evomerge_opt.merge._base import topk_mask
from evomerge_opt.merge.engine import stream_merge
from evomerge_opt.merge.methods import METHODS, StreamInputs
from evomerge_opt.merge.methods.keepers import ThresholdKeeper, magnitude_keeper

# Large enough that the MLP weights (256 x 640) and embeddings (600 x 256) take the sampled-band path.
MEDIUM = {"vocab_size": 600, "hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module", params=["bfloat16", "float16", "float32"])
def family(request, tmp_path_factory) -> dict[str, Path]:
    from evomerge_opt.zoo.random_models import TINY_LLAMA, save_random_family

    spec = TINY_LLAMA.model_copy(update={**MEDIUM, "dtype": request.param})
    return save_random_family(spec, tmp_path_factory.mktemp(f"medium_{request.param}"), delta_std=0.01)


def _recipe(family: dict[str, Path], **over) -> dict:
    data = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft0"]), "parameters": {"weight": 0.6, "density": 0.3}},
            {"model": str(family["ft1"]), "parameters": {"weight": 0.4, "density": [0.2, 0.7]}},
        ],
    }
    data.update(over)
    return data


def test_prepass_topk_is_the_merge_selection(family):
    recipe = load_recipe(_recipe(family))
    tasks = prepass.plan(recipe)
    assert {t.model_index for t in tasks} == {0, 1}
    assert any(t.numel >= topk.BAND_MIN_NUMEL for t in tasks) and any(t.numel < topk.BAND_MIN_NUMEL for t in tasks)
    table = prepass.compute(tasks)
    base = CheckpointReader(family["base"])
    sources = [CheckpointReader(family["ft0"]), CheckpointReader(family["ft1"])]
    for task in tasks:
        density = task.k / task.numel
        inputs = StreamInputs(base.get_tensor(task.name), [sources[task.model_index].get_tensor(task.name)])
        own = magnitude_keeper(inputs, 0, density)
        known = table[task.name, task.model_index]
        mine = ThresholdKeeper.from_topk(known)
        assert known.k == task.k
        assert (mine.threshold, mine.ties, mine.shrink) == (own.threshold, own.ties, own.shrink), task.name
        assert (mine.tied_positions is None) == (own.tied_positions is None)
        if own.tied_positions is not None:
            assert np.array_equal(mine.tied_positions, own.tied_positions)
        # The merge takes a known selection as it is, and ignores one made for another k.
        marked = replace(known, threshold=-1.0)
        assert magnitude_keeper(StreamInputs(inputs._base, inputs._sources, [marked]), 0, density).threshold == -1.0
        other_k = replace(marked, k=known.k + 1)
        assert magnitude_keeper(StreamInputs(inputs._base, inputs._sources, [other_k]), 0, density).threshold == own.threshold
        # And both are the reference top-k mask.
        delta = (sources[task.model_index].get_tensor(task.name).float() - base.get_tensor(task.name).float()).reshape(-1)
        reference = topk_mask(delta.abs(), density)
        kept = delta.abs() > known.threshold
        if known.tied_positions is not None:
            kept[torch.from_numpy(known.tied_positions)] = True
        assert torch.equal(kept, reference), task.name


def test_apply_is_byte_identical_with_prepass_threads_and_processes(family, tmp_path, monkeypatch):
    recipe = _recipe(family)
    plain = stream_merge(recipe, tmp_path / "plain", workers=2)
    table = prepass.compute(prepass.plan(load_recipe(recipe)))
    outputs = {}
    for processes in (False, True):
        monkeypatch.setattr(engine, "use_processes", lambda device, workers, p=processes: p)
        outputs[processes] = stream_merge(recipe, tmp_path / f"fast_{processes}", workers=2, known_topk=table)
    expected = (plain / "model.safetensors").read_bytes()
    for out in outputs.values():
        assert (out / "model.safetensors").read_bytes() == expected


def test_cli_apply_forks_the_prepass_before_torch(family, tmp_path):
    """A fresh `evo-merge apply` (no torch imported yet) runs the pre-pass and forked workers."""
    recipe_file = tmp_path / "ties.yml"
    save_yaml(_recipe(family), recipe_file)
    plain = stream_merge(_recipe(family), tmp_path / "plain")
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "evomerge_opt.cli.main", "-vv", "apply", str(recipe_file),
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top-k selections ready" in proc.stderr
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


def test_failed_prepass_warns_and_leaves_the_selection_to_the_merge(family, tmp_path, caplog):
    import multiprocessing

    task = prepass.plan(load_recipe(_recipe(family)))[0]
    missing = type(task.base)(tmp_path / "gone.safetensors", task.base.dtype, task.base.shape, 8, 16)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=prepass._child, args=([prepass.TopKTask(task.name, 0, missing, missing, 1)], sender))
    process.start()
    sender.close()
    with caplog.at_level(logging.WARNING, logger="evomerge_opt.merge.prepass"):
        assert prepass.Prepass(process, receiver, 1).result() is None
    assert "pre-pass failed" in caplog.text and "gone.safetensors" in caplog.text


def test_prepass_skips_what_it_cannot_do(family, tiny_llama_family):
    assert prepass.plan(load_recipe(_recipe(family, merge_method="dare_ties"))) == []
    assert prepass.plan(load_recipe(_recipe(family, parameters={"sparsify": "random"}))) == []
    assert prepass.plan(load_recipe(_recipe(family, merge_method="task_arithmetic", parameters={"sparsify": "magnitude"})))
    assert prepass.start(load_recipe(_recipe(family))) is None  # torch is imported here: no fork


def test_forked_worker_failure_is_reported_and_leaves_nothing(family, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan_src"
    shutil.copytree(family["ft0"], bad)
    for file in bad.glob("*.safetensors"):
        state = load_file(file)
        state["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
        save_file(state, file, metadata={"format": "pt"})
    recipe = _recipe(family, merge_method="task_arithmetic")
    recipe["models"][0]["model"] = str(bad)
    monkeypatch.setattr(engine, "use_processes", lambda device, workers: True)
    outs = tmp_path / "outs"
    outs.mkdir()
    with pytest.raises(NonFiniteResultError, match="model.layers.1.mlp.up_proj.weight"):
        stream_merge(recipe, outs / "m", workers=2)
    assert list(outs.iterdir()) == []


def test_mapped_tensors_equal_read_ones_and_truncation_is_an_error(family, tmp_path):
    import shutil

    reader = CheckpointReader(family["ft1"])
    for name in reader.names():
        assert torch.equal(reader.map_tensor(name), reader.get_tensor(name))
    cut = tmp_path / "cut"
    shutil.copytree(family["ft1"], cut)
    file = next(cut.glob("*.safetensors"))
    with open(file, "r+b") as handle:
        handle.truncate(file.stat().st_size - 4096)
    last = max(CheckpointReader(cut).names(), key=lambda n: CheckpointReader(cut).info(n).end)
    with pytest.raises(ModelSourceError, match="truncated"):
        CheckpointReader(cut).map_tensor(last)


def test_torch_free_tables_match_the_registry():
    assert set(METHOD_NAMES) <= set(METHODS.names())
    magnitude = {name for name in METHODS.names() if METHODS.get(name).default_sparsify == "magnitude"}
    assert prepass.MAGNITUDE_BY_DEFAULT == magnitude


def test_loading_a_recipe_does_not_import_torch(family, tmp_path):
    recipe_file = tmp_path / "r.yml"
    save_yaml(_recipe(family), recipe_file)
    code = ("import sys; from evomerge_opt.config.recipe import load_recipe; from evomerge_opt.merge import prepass; "
            f"prepass.plan(load_recipe({str(recipe_file)!r})); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_band_scan_matches_a_full_selection_with_ties():
    rng = np.random.default_rng(0)
    magnitude = np.abs(np.round(rng.standard_normal(200_003) * 4) / 4).astype(np.float32)  # many ties
    for k in (1, 777, 100_000, 200_002):
        offset, stride, count = topk.sample_layout(magnitude.size, 1000)
        assert stride == 1 or np.gcd(stride, 1000) == 1
        lo, hi = topk.band_bounds(magnitude[offset : offset + stride * count : stride].copy(), magnitude.size, k)
        scan = topk.BandScan(lo, hi, (np.empty(1 << 17, bool), np.empty(1 << 17, bool)))
        for start in range(0, magnitude.size, 1 << 17):
            scan.add(start, magnitude[start : start + (1 << 17)])
        found, whole = scan.result(k), topk.select_all(magnitude, k)
        if found is None:  # the band missed: the caller selects all
            found = whole
        assert (found.threshold, found.ties, found.equal) == (whole.threshold, whole.ties, whole.equal)
        assert np.array_equal(found.tied_positions, whole.tied_positions)
        mask = magnitude > found.threshold
        mask[found.tied_positions] = True
        assert mask.sum() == k
        assert torch.equal(torch.from_numpy(mask), topk_mask(torch.from_numpy(magnitude), k / magnitude.size))
