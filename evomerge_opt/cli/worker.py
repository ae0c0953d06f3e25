"""``evo-merge worker``: join a running study from another process or machine.

``evo-merge worker --study NAME --storage URL`` reads the search space from the study itself
(``study.user_attrs['space']``), loads the models once and runs trials until the study's budget is
used up (``--trials N``: at most N trials in this worker). Use PostgreSQL for several machines.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="Name of the running study.")
    parser.add_argument("--storage", required=True, help="SQLAlchemy URL of its storage.")
    parser.add_argument("--trials", type=int, default=None, help="At most this many trials in this worker.")
    parser.add_argument("--device", default=None, help="Device (default: cuda if available).")
    parser.add_argument("--recipes-dir", default="recipes", help="Where best_<study>.yaml is written.")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="Separates this worker's sampler random stream (default: from the process id).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")


def run(args: argparse.Namespace) -> int:
    from evomerge_opt.errors import ConfigError
    from evomerge_opt.search.runner import SearchRunner, summary

    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"`--trials >= 1` must hold, but got --trials {args.trials}.")
    runner = SearchRunner(
        None, study_name=args.study, storage=args.storage, device=args.device, recipes_dir=args.recipes_dir,
        worker=True, worker_trials=args.trials, seed_offset=args.seed_offset, progress=not args.no_progress,
    )
    study = runner.run()
    info = summary(study)
    print(f"worker on study {args.study}: {info['states']}; best trial {info['best_trial']} "
          f"(perplexity {info['best_perplexity']})")
    return 0
