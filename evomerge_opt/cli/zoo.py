"""``evo-merge zoo build|info``: build the pico model zoo (offline, on CPU) or describe the built one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", metavar="{build,info}", required=True)
    build = sub.add_parser("build", help="Build the zoo (cached: returns at once when already built).")
    build.add_argument("--root", type=Path, default=None, help="Zoo directory (default: $EVOMERGE_ZOO or "
                       "~/.cache/evomerge/zoo).")
    build.add_argument("--force", action="store_true", help="Rebuild even when the same settings are built.")
    build.add_argument("--preset", choices=["default", "small"], default="default",
                       help="default: the demo's zoo (a few minutes); small: seconds, for tests.")
    build.add_argument("--threads", type=int, default=None, help="torch threads for training (default: 1, "
                       "fastest for these tiny models when the cores are shared).")
    info = sub.add_parser("info", help="Print the built zoo's manifest (settings, versions, sizes).")
    info.add_argument("--root", type=Path, default=None)
    info.add_argument("--json", action="store_true", help="Print the raw zoo.json.")


def run(args: argparse.Namespace) -> int:
    from evomerge_opt.paths import zoo_root

    root = (args.root or zoo_root()).expanduser()
    if args.zoo_command == "build":
        from evomerge_opt.zoo.build import build_zoo
        from evomerge_opt.zoo.settings import preset

        settings = preset(args.preset)
        if args.threads:
            settings = settings.model_copy(update={"threads": args.threads})
        path = build_zoo(settings, root=root, force=args.force)
        print(f"pico zoo ({args.preset}, {settings.settings_hash()}) at {path}")
        return 0
    from evomerge_opt.zoo.build import read_manifest

    manifest = read_manifest(root)
    if manifest is None:
        print(f"No pico zoo at {root}; build it with `evo-merge zoo build`.")
        return 1
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    print(f"pico zoo at {root}")
    print(f"  settings hash {manifest['settings_hash']}, built {manifest['built_at']} "
          f"in {manifest.get('build_seconds', '?')} s")
    print(f"  models: {', '.join(manifest['models'])} ({manifest['parameters']:,} parameters each, "
          f"vocabulary {manifest['vocab_size']})")
    print(f"  target task: {manifest['target_task']}  (zoo:data/{manifest['target_task']}/dev.jsonl)")
    for task, splits in manifest["tasks"].items():
        print(f"  data/{task}: " + ", ".join(f"{s} {n}" for s, n in sorted(splits.items())))
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest["versions"].items())))
    return 0
