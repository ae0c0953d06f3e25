"""`evo-merge report --study NAME [--storage URL] [--out DIR]`: PNG plots of a study."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="Study name.")
    parser.add_argument(
        "--storage",
        default=None,
        help="SQLAlchemy URL of the study storage (default: sqlite:///studies/<study>.db).",
    )
    parser.add_argument("--out", default=None, help="Output folder (default: reports/<study>/).")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evomerge_opt.search.report import write_report
    from evomerge_opt.search.storage import load_study

    # Reading a study needs no heartbeat: this process runs no trial.
    study = load_study(args.study, args.storage, heartbeat_interval=None)
    out = Path(args.out) if args.out else Path("reports") / args.study
    written = write_report(study, out)
    for path in written:
        print(path)
    return 0
