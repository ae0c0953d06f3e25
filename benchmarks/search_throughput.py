"""Search throughput on the pico zoo: trials per minute, the share of a trial that is not evaluation,
and what pruning saves.

Two searches over the same space, sampler and seed, in one run (CONTRIBUTING.md: ratios against a
baseline measured in the same run):

* ``no pruning``  — the space with ``pruner: none`` (the baseline);
* ``pruning``     — the space's own pruner (``--pruner`` overrides it; default ``median``).

With the (default) ``random`` sampler both searches evaluate exactly the same candidates (the sampler
does not look at the values), so "evaluation tokens saved at equal best fitness" is a like-for-like
comparison: the pruned run must find the same best perplexity while scoring fewer tokens.

Figures per search (each in its own SQLite study, heartbeats on, as ``evo-merge search`` runs):

* trials/min — trials / wall time of ``SearchRunner.run()`` (models already loaded);
* non-eval share — ``1 - evaluation time / trial-loop time``, in wall time and in CPU time (process
  time, far less sensitive than wall time to other load on a shared machine). It holds sampling,
  decoding, the in-memory build, storage round trips and callbacks. Target: under 15%. The CPU share
  is split into the candidate build (merge engine + DFS assembly) and the rest (the search machinery);
* eval tokens — tokens scored over all trials; best perplexity and trial.

Usage::

    .venv/bin/python benchmarks/search_throughput.py                  # search_spaces/ps_dfs.yaml, 30 trials
    .venv/bin/python benchmarks/search_throughput.py --space search_spaces/ps.yaml --trials 40 --sampler cmaes

The pico zoo is built first when missing (``EVOMERGE_ZOO`` or ``--zoo`` says where).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]


def _measure(space_data: dict, trials: int, workdir: Path, device: str | None) -> dict:
    import optuna
    from optuna.trial import TrialState

    from evomerge_opt.search.runner import SearchRunner

    runner = SearchRunner(space_data, study_name="bench", storage=f"sqlite:///{workdir / 'bench.db'}",
                          trials=trials, device=device, recipes_dir=workdir / "recipes", progress=False)
    t0 = time.perf_counter()
    runner.setup()
    setup_s = time.perf_counter() - t0

    evaluator = runner.objective.evaluator
    spent = {"wall": 0.0, "cpu": 0.0}
    original = evaluator.evaluate

    def timed(model, on_batch=None, max_batches=None):
        w, c = time.perf_counter(), time.process_time()
        try:
            return original(model, on_batch=on_batch, max_batches=max_batches)
        finally:
            spent["wall"] += time.perf_counter() - w
            spent["cpu"] += time.process_time() - c

    evaluator.evaluate = timed
    builder = runner.objective.builder
    build_original = builder.build
    built = {"cpu": 0.0}

    def timed_build(recipe, baseline=None):
        c = time.process_time()
        try:
            return build_original(recipe, baseline)
        finally:
            built["cpu"] += time.process_time() - c

    builder.build = timed_build
    w0, c0 = time.perf_counter(), time.process_time()
    study = runner.run()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    all_trials = study.get_trials()
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return {
        "trials": len(all_trials),
        "setup_s": setup_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "eval_wall_s": spent["wall"],
        "eval_cpu_s": spent["cpu"],
        "tokens": sum(int(t.user_attrs.get("tokens", 0)) for t in all_trials),
        "full_tokens": evaluator.num_tokens,
        "pruned": sum(t.state == TrialState.PRUNED for t in all_trials),
        "failed": sum(t.state == TrialState.FAIL for t in all_trials),
        "build_s": sum(float(t.user_attrs.get("build_seconds", 0.0)) for t in all_trials),
        "build_cpu_s": built["cpu"],
        "best": None if best is None else best.value,
        "best_trial": None if best is None else best.number,
        "genomes": [tuple(t.user_attrs.get("genome", ())) for t in all_trials],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "ps_dfs.yaml"))
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--sampler", default="random", help="random keeps the candidates equal across both runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruner", default=None, help="pruner of the pruned run (default: the space's, else median)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--zoo", default=None, help="pico zoo root (default: EVOMERGE_ZOO or the default root)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    args = parser.parse_args(argv)

    if args.zoo:
        os.environ["EVOMERGE_ZOO"] = args.zoo
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    from _util import format_table

    from evomerge_opt.config.space import load_space
    from evomerge_opt.zoo.build import build_zoo, read_manifest

    space = load_space(args.space).to_dict()
    zoo = None
    if any(str(ref).startswith("zoo:") for ref in space["pool"]["models"].values()):
        zoo = read_manifest()
        if zoo is None:  # no zoo there at all (a zoo built with other settings is used as it is)
            print("building the pico zoo first ...", flush=True)
            build_zoo()
            zoo = read_manifest()
    space["sampler"].update(name=args.sampler, seed=args.seed)
    pruned_spec = dict(space["pruner"])
    if args.pruner:
        pruned_spec["name"] = args.pruner
    elif pruned_spec["name"] == "none":
        pruned_spec["name"] = "median"

    results = {}
    for label, pruner in (("no pruning", {"name": "none"}), (f"pruning ({pruned_spec['name']})", pruned_spec)):
        data = dict(space, pruner=pruner)
        with tempfile.TemporaryDirectory(prefix="evomerge_bench_") as tmp:
            print(f"running {label}: {args.trials} trials of {Path(args.space).name} ({args.sampler}) ...", flush=True)
            results[label] = _measure(data, args.trials, Path(tmp), args.device)

    rows = []
    for label, r in results.items():
        rows.append([
            label,
            str(r["trials"]),
            f"{60 * r['trials'] / r['wall_s']:.1f}",
            f"{60 * r['trials'] / r['cpu_s']:.1f}",
            f"{100 * (1 - r['eval_wall_s'] / r['wall_s']):.1f}%",
            f"{100 * (1 - r['eval_cpu_s'] / r['cpu_s']):.1f}%",
            f"{100 * r['build_cpu_s'] / r['cpu_s']:.1f}%",
            f"{100 * (1 - (r['eval_cpu_s'] + r['build_cpu_s']) / r['cpu_s']):.1f}%",
            f"{r['build_cpu_s'] / max(r['trials'], 1) * 1000:.1f}",
            f"{r['tokens']:,}",
            f"{r['pruned']}/{r['failed']}",
            "-" if r["best"] is None else f"{r['best']:.4f} (#{r['best_trial']})",
        ])
    print()
    print(format_table(["run", "trials", "trials/min wall", "trials/min cpu", "non-eval wall", "non-eval cpu",
                        "of which build", "of which search", "build cpu ms/trial", "eval tokens",
                        "pruned/failed", "best perplexity"], rows))
    print("non-eval = 1 - evaluation / trial loop; build = the in-memory candidate build (merge engine + DFS "
          "assembly); search = the rest (sampler, codec, storage, callbacks)")
    base, pruned = results["no pruning"], list(results.values())[1]
    print()
    if zoo is not None:
        from evomerge_opt.paths import zoo_root

        print(f"pico zoo at {zoo_root()} (settings {zoo.get('settings_hash')})")
    print(f"setup (models loaded, data tokenised, baselines enqueued): {base['setup_s']:.1f} s; "
          f"{base['full_tokens']:,} tokens per full evaluation")
    print(f"pruning: eval tokens x{pruned['tokens'] / base['tokens']:.3f} of the unpruned run "
          f"({100 * (1 - pruned['tokens'] / base['tokens']):.1f}% saved); "
          f"trials/min x{(pruned['trials'] / pruned['wall_s']) / (base['trials'] / base['wall_s']):.2f}")
    same = base["genomes"] == pruned["genomes"]
    if base["best"] is not None and pruned["best"] is not None:
        equal = abs(base["best"] - pruned["best"]) <= 1e-9 * abs(base["best"])
        print(f"best perplexity: {base['best']:.6f} without vs {pruned['best']:.6f} with pruning "
              f"({'equal' if equal else 'DIFFERENT'}); same candidates in both runs: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
