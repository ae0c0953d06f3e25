"""`evo-merge export --study NAME [--trial N | --best] [--format evomerge|mergekit] [--out FILE]`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="Study name.")
    parser.add_argument(
        "--storage",
        default=None,
        help="SQLAlchemy URL of the study storage (default: sqlite:///studies/<study>.db).",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, default=None, help="Trial number to export.")
    which.add_argument("--best", action="store_true", help="Export the best completed trial (the default).")
    parser.add_argument(
        "--format",
        choices=("evomerge", "mergekit"),
        default="evomerge",
        help="evomerge: the recipe `evo-merge apply` takes, with provenance; mergekit: a mergekit config (PS only).",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="Output YAML file, '-' for stdout (default: recipes/<study>_trial<N>[.mergekit].yaml).",
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import sys
    from pathlib import Path

    from evomerge_opt.config.yamlio import dump_yaml, save_yaml
    from evomerge_opt.search import export
    from evomerge_opt.search.storage import load_study

    log = logging.getLogger("evomerge_opt.cli.export")
    study = load_study(args.study, args.storage, heartbeat_interval=None)
    trial = export.select_trial(study, args.trial)
    header = f"evo-merge {args.format} export of study {study.study_name!r}, trial {trial.number}"
    if args.format == "mergekit":
        data, notes = export.to_mergekit(export.trial_recipe(trial))
        for note in notes:
            log.warning("mergekit export: %s", note)
        prov = export.provenance(study, trial)
        header += "\n" + "\n".join(f"{key}: {value}" for key, value in prov.items())
        suffix = ".mergekit.yaml"
    else:
        data = export.evomerge_recipe(study, trial)
        suffix = ".yaml"
    if args.out == "-":
        sys.stdout.write(dump_yaml(data))
        return 0
    out = Path(args.out) if args.out else Path("recipes") / f"{study.study_name}_trial{trial.number}{suffix}"
    save_yaml(data, out, header=header)
    print(out)
    return 0
