"""Wall time and peak memory of ``evo-merge apply`` against ``mergekit-yaml`` on the same merges.

Three Llama models of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
intermediate 1536, vocab 49152, tied embeddings) with random bf16 weights are made locally (a base and
two "fine-tunes" = base + N(0, 0.01^2) noise) and cached under ``--workdir``. One recipe per method
(TIES and DARE-TIES, density 0.3, weights 0.5/0.5, normalize on, lambda 1) is written in mergekit's
layout, which is also evo-merge's recipe format, and each tool merges it as a subprocess:

    <this venv>/bin/evo-merge apply RECIPE --out DIR --device cpu
    .venv-mergekit/bin/mergekit-yaml RECIPE DIR --no-cuda --lazy-unpickle --copy-tokenizer

mergekit is only an outside baseline: it lives in its own virtual environment (``.venv-mergekit``,
created here when missing, torch pinned to the same version as ours) and is never imported. Runs
alternate their order between repeats; the table gives medians. Peak memory is the summed RSS of
each tool's process tree polled every 20 ms (plus the kernel's exact ru_maxrss of the main process),
and "anon" is the part not backed by files (mmap'ed safetensors pages are in RSS but can be dropped).

Afterwards both outputs are loaded with ``AutoModelForCausalLM.from_pretrained`` (finite logits
required) and our TIES tensors are compared with mergekit's (reported, not asserted: mergekit keeps
``int(k * n)`` entries and computes in bf16, evo-merge keeps ``round(k * n)`` and may compute in fp32).

    .venv/bin/python benchmarks/apply_speed.py                 # full comparison, 1 repeat
    .venv/bin/python benchmarks/apply_speed.py --repeat 3 --threads 2
    .venv/bin/python benchmarks/apply_speed.py --skip-mergekit # evo-merge only (explicit)
    .venv/bin/python benchmarks/apply_speed.py --device cuda   # both tools on the GPU
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the harness stays light while it measures
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import (
    BenchmarkError,
    RunResult,
    Summary,
    ensure_venv,
    find_executable,
    format_table,
    ratio,
    run_measured,
    summarize_pyspy_raw,
    venv_bin,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path("/tmp/evomerge_bench")
DEFAULT_MERGEKIT_VENV = REPO / ".venv-mergekit"
METHODS = ("ties", "dare_ties")
TOOLS = ("evo-merge", "mergekit")
# Tensors compared between the two TIES outputs: embeddings (the largest), attention with GQA
# (k_proj is [192, 576]), an MLP matrix, a norm, first / middle / last layer.
COMPARE_TENSORS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.15.mlp.down_proj.weight",
    "model.layers.29.mlp.gate_proj.weight",
    "model.layers.29.input_layernorm.weight",
    "model.norm.weight",
)
FAMILY_SEED = 0
DELTA_STD = 0.01


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# setup: mergekit venv, models, recipes
# --------------------------------------------------------------------------------------------------


def _torch_version() -> str:
    """Our torch version without a local tag (``2.13.0+cpu`` -> ``2.13.0``), pinned in mergekit's venv."""
    return importlib.metadata.version("torch").split("+")[0]


def ensure_mergekit_venv(venv: Path = DEFAULT_MERGEKIT_VENV, torch_version: str | None = None) -> Path:
    """Return ``venv`` with ``mergekit-yaml`` installed, creating the environment when it is missing.

    torch is installed first and pinned (constraint) to the version of our own environment, so the
    two tools run on the same kernels and mergekit's resolver never swaps in another build. When
    mergekit's own pins refuse that torch, mergekit is installed ``--no-deps`` and its remaining
    requirements (all but torch) are installed under the same constraint. Raises BenchmarkError with
    pip's output when neither works.
    """
    torch_version = torch_version or _torch_version()
    pin = f"torch=={torch_version}"
    try:
        return ensure_venv(
            venv, ["mergekit"], constraints=[pin], first=[pin], check_executable="mergekit-yaml", log=log
        )
    except BenchmarkError as first_error:
        log(f"mergekit with {pin} did not resolve; retrying with --no-deps:\n{first_error}")
    try:
        ensure_venv(venv, ["--no-deps", "mergekit"], constraints=[pin], first=[pin], log=log)
        py = venv_bin(venv, "python")
        reqs = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('mergekit') or []))"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()
        # Keep unconditional requirements except torch (markers such as `extra == "dev"` are skipped).
        rest = [r for r in reqs if r.strip() and ";" not in r and not r.lower().startswith("torch")]
        if rest:
            ensure_venv(venv, rest, constraints=[pin], log=log)
    except (BenchmarkError, subprocess.CalledProcessError) as exc:
        raise BenchmarkError(
            f"could not install mergekit into {venv} with {pin}: {exc}\n"
            "Install it by hand (see benchmarks/README.md) or run with --skip-mergekit to measure "
            "evo-merge alone."
        ) from exc
    if not venv_bin(venv, "mergekit-yaml").exists():
        raise BenchmarkError(f"mergekit-yaml is missing from {venv} after installing mergekit")
    return venv


def _bench_tokenizer():
    """A small byte-level BPE tokenizer trained in memory (vocab 512 <= the models' 49152 rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    text = [
        "the quick brown fox jumps over the lazy dog",
        "what is two plus three? the answer is five.",
        "merging models adds their task vectors to a shared base model.",
        "trim, elect sign, and disjoint merge are the three steps of ties.",
    ] * 50
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def ensure_models(workdir: Path, shard_size: str, regen: bool = False) -> dict[str, Path]:
    """Base + ft0 + ft1 of SmolLM2-135M's shape (bf16, random) under ``workdir/models``, cached.

    The cache is keyed by a stamp holding the spec, noise, seed and shard size; it is rebuilt when
    any differs or ``regen`` is set. Built in a staging directory renamed at the end, so an
    interrupted build is never mistaken for a complete one.
    """
    import torch

    from evomerge_opt.zoo.random_models import SMOLLM2_135M, save_random_family

    root = workdir / "models"
    stamp_data = {
        "spec": SMOLLM2_135M.model_dump(mode="json") if hasattr(SMOLLM2_135M, "model_dump") else repr(SMOLLM2_135M),
        "delta_std": DELTA_STD, "seed": FAMILY_SEED, "shard_size": shard_size, "version": 1,
    }
    names = ("base", "ft0", "ft1")
    stamp = root / "stamp.json"
    fresh = not regen and stamp.exists() and json.loads(stamp.read_text()) == stamp_data
    if fresh and all((root / n / "config.json").exists() for n in names):
        log(f"reusing models in {root}")
        return {n: root / n for n in names}
    log(f"building 3 random SmolLM2-135M-shaped bf16 models in {root} (one-off, ~1 min)")
    torch.set_num_threads(1)
    staging = workdir / "models.partial"
    shutil.rmtree(staging, ignore_errors=True)
    paths = save_random_family(
        SMOLLM2_135M, staging, n_finetunes=2, delta_std=DELTA_STD, seed=FAMILY_SEED,
        max_shard_size=shard_size, tokenizer=_bench_tokenizer(),
    )
    if set(paths) != set(names):
        raise BenchmarkError(f"save_random_family wrote {sorted(paths)}, expected {list(names)}")
    (staging / "stamp.json").write_text(json.dumps(stamp_data, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return {n: root / n for n in names}


def write_recipe(method: str, models: dict[str, Path], density: float, weights: tuple[float, float],
                 out: Path, dtype: str = "bfloat16") -> Path:
    """A recipe in mergekit's layout (also evo-merge's): both tools read this same file unchanged."""
    import yaml

    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models[name]), "parameters": {"weight": w, "density": density}}
            for name, w in zip(("ft0", "ft1"), weights)
        ],
        "parameters": {"normalize": True, "lambda": 1.0},
        "dtype": dtype,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def warm_page_cache(models: dict[str, Path]) -> None:
    """Read every model file once so no tool pays the first cold read from disk."""
    for path in models.values():
        for file in sorted(path.iterdir()):
            if file.is_file():
                with open(file, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


# --------------------------------------------------------------------------------------------------
# measured runs
# --------------------------------------------------------------------------------------------------


def _tool_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
    })
    return env


def _mergekit_options(mergekit_yaml: Path) -> set[str]:
    """The long options this mergekit version accepts (options differ between releases)."""
    proc = subprocess.run([str(mergekit_yaml), "--help"], capture_output=True, text=True,
                          env=_tool_env(1), check=False)
    return {tok.rstrip(",") for tok in proc.stdout.split() if tok.startswith("--")}


def tool_argv(tool: str, recipe: Path, out: Path, device: str, threads: int, evo_merge: Path,
              mergekit_yaml: Path | None, mergekit_opts: set[str]) -> list[str]:
    if tool == "evo-merge":
        return [str(evo_merge), "apply", str(recipe), "--out", str(out), "--device", device, "--no-progress"]
    assert mergekit_yaml is not None
    argv = [str(mergekit_yaml), str(recipe), str(out), "--cuda" if device == "cuda" else "--no-cuda"]
    # Comparable settings: lazy loading for lower memory when offered, tokenizer copied like ours,
    # same thread count, fixed seed for the DARE masks.
    for flag in ("--lazy-unpickle", "--copy-tokenizer", "--quiet"):
        if flag in mergekit_opts:
            argv.append(flag)
    if "--num-threads" in mergekit_opts:
        argv += ["--num-threads", str(threads)]
    if "--random-seed" in mergekit_opts:
        argv += ["--random-seed", "0"]
    return argv


def startup_argv(tool: str, evo_merge: Path, mergekit_yaml: Path | None) -> list[str]:
    """A command that pays a tool's fixed start-up (interpreter + imports of its merge path) and stops.

    evo-merge: its console script's Python importing the CLI and the streaming engine (torch);
    mergekit: ``mergekit-yaml --help``, which imports its whole merge stack before parsing options.
    """
    if tool == "evo-merge":
        python = evo_merge.parent / "python"
        return [str(python), "-c", "import evomerge_opt.cli.main, evomerge_opt.cli.apply, evomerge_opt.merge.engine"]
    assert mergekit_yaml is not None
    return [str(mergekit_yaml), "--help"]


def run_tool(tool: str, method: str, index: int, argv: list[str], out: Path, workdir: Path,
             threads: int) -> RunResult:
    shutil.rmtree(out, ignore_errors=True)
    # Flush the dirty pages of earlier runs first: otherwise the kernel writes the previous tool's
    # 270 MB output back during this run, which costs the short runs (evo-merge) far more than the
    # long ones. Neither tool then pays for write-back: each is timed until its files are written
    # to the page cache, as a user waits for it.
    os.sync()
    log_path = workdir / "logs" / f"{tool}_{method}_{index}.log"
    log(f"run {index}: {tool} {method}: {' '.join(argv)}")
    result = run_measured(argv, env=_tool_env(threads), log_path=log_path).check(f"{tool} ({method})")
    log(f"  -> {result.wall_s:.2f} s wall, {result.cpu_s:.2f} s cpu, peak RSS {result.peak_rss_mib:.0f} MiB "
        f"(anon {result.peak_anon_mib:.0f} MiB), {result.samples} samples")
    return result


def profile_evomerge(method: str, recipe: Path, workdir: Path, device: str, threads: int, evo_merge: Path,
                     top: int = 25) -> str:
    """One extra (unmeasured) ``evo-merge apply`` under a profiler; returns a text summary.

    py-spy (sampling, all threads, 100 Hz) when it is installed in this venv or on PATH, else cProfile
    (main thread only, sorted by own time). The raw profile stays in ``workdir/profile``.
    """
    out = workdir / "out" / f"profile_{method}"
    shutil.rmtree(out, ignore_errors=True)
    prof_dir = workdir / "profile"
    prof_dir.mkdir(parents=True, exist_ok=True)
    argv = tool_argv("evo-merge", recipe, out, device, threads, evo_merge, None, set())
    pyspy = find_executable("py-spy", Path(sys.executable).parent.parent)
    try:
        if pyspy is not None:
            raw = prof_dir / f"evo-merge_{method}.pyspy.txt"
            run_measured([str(pyspy), "record", "-r", "100", "-f", "raw", "-o", str(raw), "--", *argv],
                         env=_tool_env(threads), log_path=prof_dir / f"evo-merge_{method}.log").check("py-spy")
            return f"py-spy profile of evo-merge apply ({method}), {raw}:\n" + summarize_pyspy_raw(raw, top)
        import pstats

        stats_file = prof_dir / f"evo-merge_{method}.cprofile"
        run_measured([sys.executable, "-m", "cProfile", "-o", str(stats_file), *argv], env=_tool_env(threads),
                     log_path=prof_dir / f"evo-merge_{method}.log").check("cProfile run")
        import io

        text = io.StringIO()
        pstats.Stats(str(stats_file), stream=text).sort_stats("tottime").print_stats(top)
        return f"cProfile of evo-merge apply ({method}), main thread, {stats_file}:\n{text.getvalue()}"
    finally:
        shutil.rmtree(out, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------------


def check_output_loads(out: Path) -> dict:
    """Load ``out`` with plain transformers; require finite logits. Returns a small report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    if not torch.isfinite(logits).all():
        raise BenchmarkError(f"{out}: the merged model gives non-finite logits")
    return {"params": sum(p.numel() for p in model.parameters()), "logits_abs_mean": logits.abs().mean().item(),
            "shards": len(list(out.glob("*.safetensors")))}


def _read_tensors(out: Path, names: tuple[str, ...]) -> tuple[dict, set[str]]:
    from safetensors import safe_open

    tensors, all_names = {}, set()
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                all_names.add(key)
                if key in names:
                    tensors[key] = fh.get_tensor(key)
    return tensors, all_names


def _ulp(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Spacing of the float grid at ``|x|`` for a format with ``mantissa_bits`` explicit bits."""
    import torch

    _, exponent = torch.frexp(x.abs().clamp_min(torch.finfo(torch.float32).tiny))  # x = m * 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exponent - 1 - mantissa_bits)


def compare_outputs(ours: Path, theirs: Path, base: Path, finetunes: list[Path] | None = None,
                    density: float | None = None) -> dict:
    """Per tensor: max/mean |ours - theirs|, share of entries that differ at all and share that differ
    by more than 2 ulps of the stored dtype (a different trim/elect decision, not rounding), next to
    the largest merged delta ``|merged - base|`` for scale.

    With ``finetunes`` and ``density`` it also counts how many differing entries sit on an exact tie
    at some source's trim threshold (``|d_i|`` equal to its k-th largest), where any choice is a valid
    top-k and two correct implementations may keep different entries.
    """
    import torch

    mine, my_names = _read_tensors(ours, COMPARE_TENSORS)
    sources = [_read_tensors(path, COMPARE_TENSORS)[0] for path in finetunes or []]
    other, other_names = _read_tensors(theirs, COMPARE_TENSORS)
    ref, _ = _read_tensors(base, COMPARE_TENSORS)
    rows = []
    for name in COMPARE_TENSORS:
        if name not in mine or name not in other:
            rows.append({"tensor": name, "missing_in": "evo-merge" if name not in mine else "mergekit"})
            continue
        stored = mine[name].dtype
        a, b = mine[name].float(), other[name].float()
        if a.shape != b.shape:
            rows.append({"tensor": name, "shape_ours": list(a.shape), "shape_mergekit": list(b.shape)})
            continue
        diff = (a - b).abs()
        bits = {"torch.bfloat16": 7, "torch.float16": 10}.get(str(stored), 23)
        beyond = diff > 2 * _ulp(a.abs().maximum(b.abs()), bits)
        delta = (b - ref[name].float()).abs() if name in ref else b.abs()
        extra = {}
        if sources and density is not None and name in ref:
            differ = diff > 0
            at_tie = torch.zeros_like(differ)
            numel, k = differ.numel(), round(density * differ.numel())
            for src in sources:
                magnitude = (src[name].float() - ref[name].float()).abs()
                threshold = magnitude.reshape(-1).kthvalue(numel - k + 1).values
                at_tie |= magnitude == threshold
            extra = {"differing": int(differ.sum()), "differing_at_threshold_ties": int((differ & at_tie).sum())}
        rows.append({
            "tensor": name, "dtype": str(stored).replace("torch.", ""), "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(), "frac_differ": (diff > 0).float().mean().item(),
            "frac_beyond_2ulp": beyond.float().mean().item(), "max_abs_merged_delta": delta.max().item(),
            **extra,
        })
    return {"tensors": rows, "only_in_evo_merge": sorted(my_names - other_names),
            "only_in_mergekit": sorted(other_names - my_names)}


def print_comparison(title: str, comparison: dict) -> None:
    print(f"\n{title} (reported, not asserted):")
    nan = float("nan")
    ties = any("differing_at_threshold_ties" in c for c in comparison["tensors"])
    rows = [[c["tensor"], c.get("dtype", "?"), c.get("max_abs_diff", nan), c.get("mean_abs_diff", nan),
             c.get("frac_differ", nan), c.get("frac_beyond_2ulp", nan), c.get("max_abs_merged_delta", nan)]
            + ([f"{c.get('differing_at_threshold_ties', '?')}/{c.get('differing', '?')}"] if ties else [])
            for c in comparison["tensors"]]
    print(format_table(["tensor", "dtype", "max |diff|", "mean |diff|", "share differing", "share > 2 ulp",
                        "max |merged delta|"] + (["diffs at threshold ties"] if ties else []), rows, floatfmt=".3g"))
    if comparison["only_in_evo_merge"] or comparison["only_in_mergekit"]:
        print(f"tensor names only in evo-merge: {comparison['only_in_evo_merge']}; "
              f"only in mergekit: {comparison['only_in_mergekit']}")


def fp32_check(models: dict[str, Path], args: argparse.Namespace, workdir: Path, evo_merge: Path,
               mergekit_yaml: Path, mergekit_opts: set[str]) -> dict:
    """TIES with ``dtype: float32`` through both tools (both then compute and store float32), compared.

    In bf16 mergekit rounds the task vectors and the sums to bf16, which moves entries across the trim
    threshold; in float32 only tie-breaking at the threshold and ``int`` vs ``round`` of ``k * n``
    remain, so this isolates whether the two TIES implementations agree.
    """
    recipe = write_recipe("ties", models, args.density, tuple(args.weights), workdir / "recipes" / "ties_fp32.yml",
                          dtype="float32")
    outs = {}
    for tool in TOOLS:
        out = workdir / "out" / f"{tool}_ties_fp32"
        argv = tool_argv(tool, recipe, out, args.device, args.threads, evo_merge, mergekit_yaml, mergekit_opts)
        run_tool(tool, "ties-fp32", 0, argv, out, workdir, args.threads)
        outs[tool] = out
    result = compare_outputs(outs["evo-merge"], outs["mergekit"], models["base"],
                             [models["ft0"], models["ft1"]], args.density)
    if not args.keep_outputs:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def machine_info(threads: int, device: str, mergekit_venv: Path | None) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads_per_tool": threads, "device": device,
            "python": platform.python_version(), "torch": importlib.metadata.version("torch")}
    try:
        info["evomerge_opt"] = importlib.metadata.version("evomerge-opt")
    except importlib.metadata.PackageNotFoundError:
        info["evomerge_opt"] = "source tree"
    if mergekit_venv is not None:
        proc = subprocess.run([str(venv_bin(mergekit_venv, "python")), "-c",
                               "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            info["mergekit"], info["mergekit_torch"] = proc.stdout.split()
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="models, recipes, outputs and logs go here (default %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="runs per tool and method (order alternates)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default %(default)s)")
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--weights", type=float, nargs=2, default=(0.5, 0.5), metavar=("W0", "W1"))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="OMP/MKL threads (and mergekit -j) for both tools (default: all cores, %(default)s)")
    p.add_argument("--shard-size", default="5GB", help="max_shard_size of the source models (default one file)")
    p.add_argument("--regen", action="store_true", help="rebuild the cached source models")
    p.add_argument("--skip-mergekit", action="store_true", help="measure evo-merge alone (no comparison)")
    p.add_argument("--mergekit-venv", type=Path, default=DEFAULT_MERGEKIT_VENV,
                   help="virtual environment for mergekit, created when missing (default %(default)s)")
    p.add_argument("--evo-merge", type=Path, default=Path(sys.executable).parent / "evo-merge",
                   help="the evo-merge executable (default: the one beside this Python)")
    p.add_argument("--profile", action="store_true",
                   help="afterwards profile one more evo-merge apply per method (py-spy if installed, else cProfile)")
    p.add_argument("--fp32-check", action="store_true",
                   help="also run TIES with dtype float32 through both tools and compare (isolates bf16 rounding)")
    p.add_argument("--keep-outputs", action="store_true", help="keep every merged directory")
    p.add_argument("--json", type=Path, default=None, help="write results here (default WORKDIR/results.json)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; this benchmark runs {list(METHODS)}")
    if not 0 < args.density <= 1:
        p.error(f"`0 < density <= 1` must hold, got {args.density}")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        import evomerge_opt  # noqa: F401  (models are built with its zoo helpers)
    except ImportError as exc:
        raise BenchmarkError(
            f"evomerge_opt is not importable from {sys.executable} ({exc}); run the benchmark with the "
            "project's environment: `make env && .venv/bin/python benchmarks/apply_speed.py`."
        ) from exc
    if not args.evo_merge.exists():
        raise BenchmarkError(f"{args.evo_merge} not found: install the project (`make env`) or pass --evo-merge")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchmarkError("--device cuda was given but torch sees no CUDA device")

    mergekit_yaml = mergekit_venv = None
    mergekit_opts: set[str] = set()
    if not args.skip_mergekit:
        mergekit_venv = ensure_mergekit_venv(args.mergekit_venv.resolve())
        mergekit_yaml = venv_bin(mergekit_venv, "mergekit-yaml")
        mergekit_opts = _mergekit_options(mergekit_yaml)
    tools = ["evo-merge"] + ([] if args.skip_mergekit else ["mergekit"])

    models = ensure_models(workdir, args.shard_size, regen=args.regen)
    recipes = {m: write_recipe(m, models, args.density, tuple(args.weights), workdir / "recipes" / f"{m}.yml")
               for m in args.methods}
    warm_page_cache(models)
    info = machine_info(args.threads, args.device, mergekit_venv)
    log(f"machine: {info}")

    startup = {t: Summary(f"{t} start-up") for t in tools}
    summaries = {(t, m): Summary(f"{t} {m}") for t in tools for m in args.methods}
    last_out: dict[tuple[str, str], Path] = {}
    for index in range(args.repeat):
        for method in args.methods:
            order = tools if index % 2 == 0 else list(reversed(tools))
            for tool in order:
                out = workdir / "out" / f"{tool}_{method}_{index}"
                argv_ = tool_argv(tool, recipes[method], out, args.device, args.threads, args.evo_merge,
                                  mergekit_yaml, mergekit_opts)
                summaries[(tool, method)].runs.append(run_tool(tool, method, index, argv_, out, workdir,
                                                               args.threads))
                previous = last_out.get((tool, method))
                if previous is not None and not args.keep_outputs:
                    shutil.rmtree(previous, ignore_errors=True)
                last_out[(tool, method)] = out

    # Fixed start-up cost of each tool (imports), so the table can also show the per-model work alone,
    # which is what the ratio tends to for larger models.
    for index in range(args.repeat):
        for tool in tools:
            startup[tool].runs.append(run_tool(tool, "start-up", index,
                                               startup_argv(tool, args.evo_merge, mergekit_yaml),
                                               workdir / "out" / "unused", workdir, args.threads))

    # ---- verification (after all timing, so it never competes with a measured run) ----
    checks: dict[str, dict] = {}
    for (tool, method), out in last_out.items():
        checks[f"{tool} {method}"] = check_output_loads(out)
        log(f"{tool} {method}: output loads, finite logits ({checks[f'{tool} {method}']})")
    comparison = None
    if "mergekit" in tools and "ties" in args.methods:
        comparison = compare_outputs(last_out[("evo-merge", "ties")], last_out[("mergekit", "ties")],
                                     models["base"])

    # ---- report ----
    headers = ["tool", "method", "runs", "wall s", "wall range", "cpu s", "peak RSS MiB", "peak anon MiB"]
    rows = [[t, m, len(s.runs), s.wall_s, s.wall_range, s.cpu_s, s.peak_rss_mib, s.peak_anon_mib]
            for (t, m), s in summaries.items()]
    print()
    print(f"apply_speed: 3 x SmolLM2-135M-shaped bf16 models, density {args.density}, weights "
          f"{list(args.weights)}, device {args.device}, {args.threads} thread(s), {info['cores']} cores "
          f"({info['cpu']}); medians of {args.repeat} run(s)")
    rows += [[t, "start-up only", len(s.runs), s.wall_s, s.wall_range, s.cpu_s, s.peak_rss_mib, s.peak_anon_mib]
             for t, s in startup.items()]
    print(format_table(headers, rows))
    ratios = {}
    if "mergekit" in tools:
        rrows = []
        for m in args.methods:
            ours, theirs = summaries[("evo-merge", m)], summaries[("mergekit", m)]
            r = {
                "time mergekit/evo-merge": ratio(theirs.wall_s, ours.wall_s),
                "cpu mergekit/evo-merge": ratio(theirs.cpu_s, ours.cpu_s),
                "cpu excl. start-up": ratio(theirs.cpu_s - startup["mergekit"].cpu_s,
                                            ours.cpu_s - startup["evo-merge"].cpu_s),
                "RSS evo-merge/mergekit": ratio(ours.peak_rss_mib, theirs.peak_rss_mib),
                "anon evo-merge/mergekit": ratio(ours.peak_anon_mib, theirs.peak_anon_mib),
            }
            ratios[m] = r
            rrows.append([m, *r.values()])
        print()
        print(format_table(["method", *next(iter(ratios.values())).keys()], rrows))
        if "ties" in ratios:
            r = ratios["ties"]
            print(f"\ntarget (TIES): >= 10x faster -> {r['time mergekit/evo-merge']:.1f}x "
                  f"({'met' if r['time mergekit/evo-merge'] >= 10 else 'NOT met'}); peak memory no higher -> "
                  f"RSS ratio {r['RSS evo-merge/mergekit']:.2f} "
                  f"({'met' if r['RSS evo-merge/mergekit'] <= 1 else 'NOT met'})")
    if comparison is not None:
        print_comparison("TIES output (bf16), evo-merge vs mergekit", comparison)
    fp32 = None
    if args.fp32_check and "mergekit" in tools:
        fp32 = fp32_check(models, args, workdir, args.evo_merge, mergekit_yaml, mergekit_opts)
        print_comparison("TIES with dtype float32, evo-merge vs mergekit", fp32)
    results = {
        "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
        "runs": {f"{t} {m}": [asdict(r) | {"log_path": str(r.log_path), "output_tail": ""} for r in s.runs]
                 for (t, m), s in summaries.items()},
        "startup": {t: {"wall_s": s.wall_s, "cpu_s": s.cpu_s, "peak_rss_mib": s.peak_rss_mib} for t, s in startup.items()},
        "medians": {f"{t} {m}": {"wall_s": s.wall_s, "cpu_s": s.cpu_s, "peak_rss_mib": s.peak_rss_mib,
                                 "peak_anon_mib": s.peak_anon_mib} for (t, m), s in summaries.items()},
        "ratios": ratios, "checks": checks, "ties_comparison": comparison,
        "ties_fp32_comparison": fp32,
    }
    if args.profile:
        profiles = {}
        for method in args.methods:
            profiles[method] = profile_evomerge(method, recipes[method], workdir, args.device, args.threads,
                                                args.evo_merge)
            print("\n" + profiles[method])
        results["profiles"] = profiles
    json_path = args.json or workdir / "results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {json_path}; logs: {workdir / 'logs'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
