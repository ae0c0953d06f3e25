"""``evo-merge search``: run (or resume) an evolutionary search over merge recipes.

``evo-merge search --space search_spaces/ps_dfs.yaml --trials 200`` creates the study
``<space's study name or file stem>`` in ``sqlite:///studies/<study>.db`` (or ``--storage URL``), or
resumes it when it exists: the same command after a crash continues the same study and finishes
exactly the requested total. The best recipe is kept in ``recipes/best_<study>.yaml``.
``--n-jobs K`` starts ``K - 1`` extra ``evo-merge worker`` processes on the same storage.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", required=True, help="Search-space YAML (see search_spaces/).")
    parser.add_argument("--trials", type=int, default=None,
                        help="Total trials of the study, baselines included (default: the space's budget.trials).")
    parser.add_argument("--study", default=None, help="Study name (default: the space's `study`, else the file stem).")
    parser.add_argument("--storage", default=None,
                        help="SQLAlchemy URL of the study storage (default: sqlite:///studies/<study>.db).")
    parser.add_argument("--sampler", default=None, help="Override the space's sampler (cmaes, pycma, tpe, random, nsgaii).")
    parser.add_argument("--seed", type=int, default=None, help="Override the sampler seed.")
    parser.add_argument("--device", default=None, help="Device for models and evaluation (default: cuda if available).")
    parser.add_argument("--recipes-dir", default="recipes", help="Where best_<study>.yaml is written (default: recipes).")
    parser.add_argument("--n-jobs", type=int, default=1,
                        help="Worker processes on this machine (each loads the models once; default 1).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")


def run(args: argparse.Namespace) -> int:
    from evomerge_opt.errors import ConfigError
    from evomerge_opt.search.runner import SearchRunner, summary

    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"`--trials >= 1` must hold, but got --trials {args.trials}.")
    if args.n_jobs < 1:
        raise ConfigError(f"`--n-jobs >= 1` must hold, but got --n-jobs {args.n_jobs}.")
    runner = SearchRunner(
        args.space, study_name=args.study, storage=args.storage, trials=args.trials, sampler=args.sampler,
        seed=args.seed, device=args.device, recipes_dir=args.recipes_dir, progress=not args.no_progress,
    )
    study = runner.setup()
    url = runner.storage_url
    children = []
    for index in range(1, args.n_jobs):
        command = [sys.executable, "-m", "evomerge_opt.cli.main", "worker", "--study", runner.study_name,
                   "--storage", url, "--recipes-dir", args.recipes_dir, "--seed-offset", str(index), "--no-progress"]
        if args.device:
            command += ["--device", args.device]
        children.append(subprocess.Popen(command, env=dict(os.environ)))
    try:
        runner.run()
    finally:
        codes = [child.wait() for child in children]
    info = summary(study)
    print(f"study {runner.study_name}: {info['states']}; best trial {info['best_trial']} "
          f"(perplexity {info['best_perplexity']}{', baseline ' + info['best_baseline'] if info['best_baseline'] else ''})"
          f"; best recipe: {runner.writer.path if runner.writer else '-'}")
    if any(codes):
        print(f"evo-merge search: {sum(1 for c in codes if c)} worker process(es) failed: exit codes {codes}",
              file=sys.stderr)
        return 1
    return 0
