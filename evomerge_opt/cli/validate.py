"""``evo-merge validate FILE [FILE...]``: check recipes, pools, search spaces and model configs.

The kind of each file is detected from its keys: ``merge_method`` -> PS recipe; ``model_paths`` /
``layer_mask`` -> DFS recipe; ``search`` or ``kind`` -> search space; ``architecture`` -> model
config; a ``models`` mapping -> model pool. Every problem of every file is reported at once; no
model is loaded (local paths are checked to exist). Exit code 1 when any file has a problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from evomerge_opt.errors import ConfigError, EvoMergeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="YAML files: recipes, pool configs, search spaces, model configs.")


def detect_kind(data: Any) -> str | None:
    if not isinstance(data, Mapping):
        return None
    if "merge_method" in data:
        return "parameter-space recipe"
    if "model_paths" in data or "layer_mask" in data:
        return "data-flow-space recipe"
    if "search" in data or "kind" in data:
        return "search space"
    if "architecture" in data:
        return "model config"
    if isinstance(data.get("models"), Mapping):
        return "model pool"
    return None


def check_file(path: str) -> tuple[str | None, list[str]]:
    """(kind, problems) of one file."""
    from evomerge_opt.config.yamlio import load_yaml

    try:
        data = load_yaml(path)
    except EvoMergeError as exc:
        return None, [str(exc)]
    kind = detect_kind(data)
    try:
        if kind == "parameter-space recipe" or kind == "data-flow-space recipe":
            from evomerge_opt.config.recipe import load_recipe

            load_recipe(path)
        elif kind == "search space":
            try:
                from evomerge_opt.config.space import load_space
            except ImportError as exc:
                return kind, [f"search spaces cannot be checked: evomerge_opt.config.space is not available ({exc})."]
            load_space(path)
        elif kind == "model config":
            from evomerge_opt.config.model_config import ModelConfigSpec

            ModelConfigSpec.from_yaml_dict(dict(data), source=path)
        elif kind == "model pool":
            from evomerge_opt.pool import pool_config_problems

            problems = pool_config_problems(data)
            if problems:
                return kind, problems
        else:
            return None, [(
                "cannot tell what this file is: expected a PS recipe (`merge_method`), a DFS recipe "
                "(`model_paths`/`layer_mask`), a search space (`search`/`kind`), a model config "
                "(`architecture`) or a model pool (`models` mapping)."
            )]
    except ConfigError as exc:
        return kind, exc.problems
    except EvoMergeError as exc:
        return kind, [str(exc)]
    return kind, []


def run(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        kind, problems = check_file(path)
        if problems:
            failed += 1
            label = f" ({kind})" if kind else ""
            print(f"{path}{label}: {len(problems)} problem(s):", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
        else:
            print(f"{path}: OK: {kind}")
    return 1 if failed else 0
