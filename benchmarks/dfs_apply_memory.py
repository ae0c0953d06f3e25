"""Peak memory of DFS and PS+DFS ``apply``: streaming (dfs/stream.py) vs the in-memory path, two sizes.

For random bf16 Llama families (base + 2 fine-tunes, tied embeddings) of SmolLM2-135M and SmolLM2-360M
shape, built once under ``--workdir``, it applies

* a DFS recipe: 3 sources, ``num_r`` 2, about half the layers of each source per repetition, scalar
  scales (a layer used at several hops);
* a PS+DFS recipe: the same path with source 0 an inline TIES merge of the three models (density 0.5);

once through the in-memory path (``dfs.api.dfs_merge_from_config(recipe, output_path=...)``: every source
loaded, PS sources merged by the resident merger, the candidate saved) and once streamed
(``dfs.stream.stream_dfs_apply``, what ``evo-merge apply`` runs), each in a fresh process measured by
``_util.run_measured`` (peak RSS of the process tree, and peak anonymous RSS: RSS minus file-backed
pages, which includes neither mapped checkpoint pages the kernel can drop nor the page cache). The
outputs are compared tensor for tensor. Runs are interleaved per size (before, after, before, after
with ``--repeats 2``) and medians are printed.

    .venv/bin/python benchmarks/dfs_apply_memory.py [--sizes 135m 360m] [--repeats 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _util import MIB, Summary, format_table, run_measured

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # SmolLM2-135M and SmolLM2-360M (hidden, intermediate, layers, heads, kv heads), vocab 49152, tied.
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3},
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5},
}

BUILD = """
import sys
from evomerge_opt.zoo.random_models import SMOLLM2_135M, save_random_family
spec = SMOLLM2_135M.model_copy(update={shape!r})
save_random_family(spec, sys.argv[1], n_finetunes=2, delta_std=0.002, seed=0, max_shard_size="2GB")
"""

BEFORE = """
import sys
from evomerge_opt.dfs.api import dfs_merge_from_config
dfs_merge_from_config(sys.argv[1], output_path=sys.argv[2])
"""

AFTER = """
import sys
from evomerge_opt.dfs.stream import stream_dfs_apply
stream_dfs_apply(sys.argv[1], sys.argv[2])
"""

COMPARE = """
import sys, torch
from pathlib import Path
from safetensors import safe_open
def tensors(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
assert not bad, bad[:5]
print(len(a))
"""


def _recipe(paths: list[str], layers: int, ps: bool) -> dict:
    # Repetition 0: the lower half of source 0, the middle of 1, the upper half of 2; repetition 1 repeats
    # a quarter of source 0 and the top of 2, so several physical layers are used twice.
    def row(lo: float, hi: float) -> list[bool]:
        return [lo * layers <= i < hi * layers for i in range(layers)]

    mask = [[row(0, 0.5), row(0.4, 0.7), row(0.6, 1.0)], [row(0.25, 0.5), row(0, 0), row(0.8, 1.0)]]
    scales = [[[0.9 + 0.01 * (i % 5) for i in range(layers)] for _ in range(3)] for _ in range(2)]
    models: list = list(paths)
    if ps:
        models[0] = {"merge_method": "ties", "base_model": paths[0], "parameters": {"density": 0.5},
                     "models": [{"model": p, "parameters": {"weight": 1 / 3}} for p in paths]}
    return {"model_paths": models, "num_r": 2, "layer_mask": mask, "scaling_factors": scales,
            "input_layer_model": 0, "output_layer_model": 0, "dtype": "bfloat16"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1"})
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["135m", "360m"], choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge_bench/dfs_memory"))
    args = parser.parse_args()
    python = sys.executable
    rows = []
    for size in args.sizes:
        family_dir = args.workdir / f"family_{size}"
        if not (family_dir / "ft1" / "config.json").is_file():
            shutil.rmtree(family_dir, ignore_errors=True)
            print(f"building the {size} family in {family_dir}", flush=True)
            subprocess.run([python, "-c", BUILD.format(shape=SHAPES[size]), str(family_dir)], env=_env(), check=True)
        paths = [str(family_dir / k) for k in ("base", "ft0", "ft1")]
        with open(family_dir / "base" / "config.json") as handle:
            config = json.load(handle)
        layers = config["num_hidden_layers"]
        hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
        kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
        params = vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden) + hidden
        for kind in ("dfs", "ps+dfs"):
            recipe = args.workdir / f"{size}_{kind.replace('+', '_')}.json"
            recipe.write_text(json.dumps(_recipe(paths, layers, ps=kind == "ps+dfs")))
            results: dict[str, list] = {"before": [], "after": []}
            for repeat in range(args.repeats):
                for label, code in (("before", BEFORE), ("after", AFTER)):
                    out = args.workdir / f"out_{size}_{kind}_{label}"
                    shutil.rmtree(out, ignore_errors=True)
                    run = run_measured([python, "-c", code, str(recipe), str(out)], env=_env(),
                                       log_path=args.workdir / f"log_{size}_{kind}_{label}_{repeat}.txt")
                    run.check(f"{label} {kind} {size}")
                    results[label].append(run)
            compared = subprocess.run([python, "-c", COMPARE, str(args.workdir / f"out_{size}_{kind}_before"),
                                       str(args.workdir / f"out_{size}_{kind}_after")], env=_env(),
                                      capture_output=True, text=True, check=False)
            same = compared.returncode == 0
            before, after = Summary("before", results["before"]), Summary("after", results["after"])
            rows.append([size, kind, f"{params / 1e6:.0f}M", before.peak_rss_mib, after.peak_rss_mib,
                         before.peak_anon_mib, after.peak_anon_mib,
                         after.peak_rss_mib * MIB / params, before.wall_s, after.wall_s,
                         "identical" if same else f"DIFFERENT: {compared.stderr[-300:]}"])
            print(format_table(["size", "recipe", "params", "RSS before MiB", "RSS after MiB", "anon before MiB",
                                "anon after MiB", "after B/param", "wall before s", "wall after s", "outputs"],
                               rows[-1:], floatfmt=".1f"), flush=True)
    print()
    print(format_table(["size", "recipe", "params", "RSS before MiB", "RSS after MiB", "anon before MiB",
                        "anon after MiB", "after B/param", "wall before s", "wall after s", "outputs"], rows,
                       floatfmt=".2f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
