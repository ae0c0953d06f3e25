"""Entry point of the ``evo-merge`` console script.

Each subcommand lives in its own module under :mod:`evomerge_opt.cli` and exposes
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
Modules are imported only for the subcommand that runs, so ``evo-merge --help`` stays instant (no torch).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from evomerge_opt._version import __version__

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "search": ("evomerge_opt.cli.search", "Run (or resume) an evolutionary search over merge recipes."),
    "worker": ("evomerge_opt.cli.worker", "Join a running study as another worker."),
    "apply": ("evomerge_opt.cli.apply", "Build a merged model directory from a recipe (PS or DFS)."),
    "validate": ("evomerge_opt.cli.validate", "Check recipes, pools and search spaces; report every problem."),
    "eval": ("evomerge_opt.cli.eval", "Score a model or recipe: perplexity, accuracy, lm-eval tasks."),
    "compare": ("evomerge_opt.cli.compare", "Compare TIES/DARE with magnitude and SparseGPT trimming."),
    "export": ("evomerge_opt.cli.export", "Write any trial's recipe (evo-merge or mergekit format)."),
    "dashboard": ("evomerge_opt.cli.dashboard", "Start optuna-dashboard on a study's storage."),
    "report": ("evomerge_opt.cli.report", "Write PNG plots of a study."),
    "model": ("evomerge_opt.cli.model", "Construct or kick-test a model (build, save, a few training steps)."),
    "zoo": ("evomerge_opt.cli.zoo", "Build the pico model zoo used by the demo and tests."),
}


def _top_level_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="evo-merge",
        description="Evolutionary merge-recipe optimizer for language models.",
        epilog=f"commands:\n{listing}\n\nRun `evo-merge COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"evo-merge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="More log output (-vv for debug).")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity + 1, 2)  # default INFO, -v DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "sqlalchemy.engine"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``evo-merge`` command; returns its exit code (what tests and embedding code call)."""
    return _dispatch(argv)[0]


def console() -> NoReturn:
    """The ``evo-merge`` console script: :func:`main`, then exit.

    A command whose module sets ``FAST_EXIT = True`` (``apply``) has finished all of its output when
    it returns, so a successful run ends with ``os._exit`` after flushing the streams and logging:
    interpreter teardown with torch loaded is ~0.4 s of garbage collection over module objects, a
    tenth of a small merge, and skipping it loses nothing.
    """
    code, fast_exit = _dispatch(None)
    if fast_exit and code == 0:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _dispatch(argv: Sequence[str] | None) -> tuple[int, bool]:
    """(exit code, whether the command allows a fast exit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_level_parser()
    # Split "evo-merge [-v] COMMAND rest..." without letting the top parser see the command's options.
    split = next((i for i, token in enumerate(argv) if not token.startswith("-")), len(argv))
    top_args = top.parse_args(argv[: split + 1])
    if top_args.command is None:
        top.print_help()
        return 2, False
    module_name, help_text = COMMANDS[top_args.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"evo-merge {top_args.command}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[split + 1 :])
    _configure_logging(top_args.verbose)
    from evomerge_opt.errors import EvoMergeError  # light import; torch not needed

    try:
        return int(module.run(args) or 0), bool(getattr(module, "FAST_EXIT", False))
    except (EvoMergeError, FileExistsError, FileNotFoundError) as exc:
        print(f"evo-merge {top_args.command}: error: {exc}", file=sys.stderr)
        return 2, False
    except KeyboardInterrupt:
        print(f"evo-merge {top_args.command}: interrupted", file=sys.stderr)
        return 130, False


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console()
