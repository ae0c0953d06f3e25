"""DFS candidate: build in memory (by reference) vs load the merged directory from disk.

SmolLM2-135M-shaped random models (30 layers, hidden 576, tied embeddings, bf16). The in-memory build
is what the search does per trial (`build_dfs_candidate`: the sources' modules by reference plus new
per-hop scale/bias tensors); the baseline is what a search without it would do per trial: load the
merged model from disk (`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`).
Both are timed in this run; the ratio is printed.

    .venv/bin/python benchmarks/dfs_build.py [--models 3] [--builds 200] [--loads 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch


def _recipe(num_models: int, num_layers: int, hidden: int, seed: int) -> dict:
    """A 2-repetition path of ~num_layers * 1.3 hops over all models, scalar and vector scales + biases."""
    gen = torch.Generator().manual_seed(seed)
    mask, scales, biases = [], [], []
    for r in range(2):
        block_mask, block_scale, block_bias = [], [], []
        for m in range(num_models):
            keep = (torch.rand(num_layers, generator=gen) < (0.9 if r == 0 else 0.3) / num_models * 2).tolist()
            block_mask.append([bool(k) for k in keep])
            block_scale.append([
                (1 + 0.05 * torch.randn(hidden, generator=gen)).tolist() if l % 5 == 0 else 1.0 + 0.01 * l
                for l in range(num_layers)
            ])
            block_bias.append([0.0 if l % 3 else 0.01 for l in range(num_layers)])
        mask.append(block_mask)
        scales.append(block_scale)
        biases.append(block_bias)
    return {"model_paths": [f"m{i}" for i in range(num_models)], "num_r": 2, "layer_mask": mask,
            "scaling_factors": scales, "bias_factors": biases, "input_layer_model": 0,
            "output_layer_model": num_models - 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=3, help="number of source models (default 3)")
    parser.add_argument("--builds", type=int, default=200, help="in-memory builds timed (median)")
    parser.add_argument("--loads", type=int, default=5, help="from_pretrained loads timed (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from evomerge_opt.config.dfs_recipe import load_dfs_recipe
    from evomerge_opt.dfs.build import build_dfs_candidate
    from evomerge_opt.dfs.save import save_dfs_model
    from evomerge_opt.zoo.random_models import SMOLLM2_135M, random_model

    spec = SMOLLM2_135M
    t0 = time.perf_counter()
    models = [random_model(spec, seed=i) for i in range(args.models)]
    print(f"created {args.models} random SmolLM2-135M-shaped models ({spec.dtype}) in {time.perf_counter() - t0:.1f} s")
    recipe = load_dfs_recipe(_recipe(args.models, spec.num_hidden_layers, spec.hidden_size, seed=0))
    hops = len(recipe.hops())

    candidate = build_dfs_candidate(models, recipe)  # warm-up
    distinct = len(candidate.model.layers)
    new_bytes = sum(p.numel() * p.element_size() for p in candidate.model.hops.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in candidate.parameters())
    # Wall time and this process's CPU time (the latter is robust when other jobs share the cores).
    build_times, build_cpu = [], []
    for _ in range(args.builds):
        start, start_cpu = time.perf_counter(), time.process_time()
        candidate = build_dfs_candidate(models, recipe)
        build_times.append(time.perf_counter() - start)
        build_cpu.append(time.process_time() - start_cpu)
    build = statistics.median(build_times)

    ids = torch.randint(0, spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = candidate(ids).logits.float()
    with tempfile.TemporaryDirectory(prefix="dfs_bench_") as tmp:
        out = save_dfs_model(candidate, None, Path(tmp) / "merged", dtype=torch.bfloat16)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        load_times, load_cpu = [], []
        for _ in range(args.loads):
            start, start_cpu = time.perf_counter(), time.process_time()
            loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
            load_times.append(time.perf_counter() - start)
            load_cpu.append(time.process_time() - start_cpu)
        with torch.no_grad():
            diff = (loaded(ids).logits.float() - reference).abs().max().item()
        del loaded
    load = statistics.median(load_times)

    print(f"path: {hops} hops over {distinct} distinct layers of {args.models} models (num_r=2)")
    print(f"new tensors per candidate: {new_bytes / 1e3:.1f} kB of {total_bytes / 1e6:.1f} MB referenced")
    print(f"in-memory build (by reference), median of {args.builds}: {build * 1e3:.3f} ms "
          f"(min {min(build_times) * 1e3:.3f} ms)")
    print(f"from_pretrained of the saved directory ({size / 1e6:.0f} MB bf16), median of {args.loads}: "
          f"{load * 1e3:.1f} ms (min {min(load_times) * 1e3:.1f} ms)")
    # Not bit-equal: the random sources keep a bf16-cast rotary inv_freq, the loaded model recomputes it in fp32.
    print(f"max |logits(loaded) - logits(in-memory)|: {diff:.3g} (bf16)")
    print(f"CPU time, median: build {statistics.median(build_cpu) * 1e3:.3f} ms, "
          f"load {statistics.median(load_cpu) * 1e3:.1f} ms")
    print(f"ratio load / build (wall, medians): {load / build:.0f}x")
    print(f"ratio load / build (CPU time, medians): {statistics.median(load_cpu) / statistics.median(build_cpu):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
