"""``python -m evomerge_opt.demo`` (what ``make demo`` runs): Sakana's experiment in miniature, on CPU.

1. Build the pico zoo if it is missing (``evomerge_opt.zoo.build_zoo``; cached afterwards).
2. Run ``evo-merge search --space search_spaces/ps_dfs.yaml --trials 200`` on SQLite, the target task's
   dev set (arithmetic posed in the made-up language) as fitness. Each demo run starts a *fresh*
   study ``demo_ps_dfs`` (its old ``studies/demo_ps_dfs.db`` and ``recipes/best_demo_ps_dfs.yaml`` are
   removed first), so the table always shows what this run's search found; use ``evo-merge search``
   directly to resume or extend a study.
3. Apply the best recipe (``evo-merge apply recipes/best_demo_ps_dfs.yaml --out ...``) and the study's
   untuned TIES / DARE-TIES baselines (density 0.5), then print a table: every source, the baselines
   and the evolved recipe, with perplexity and answer accuracy on every held-out TEST set.

Options: ``--trials N`` (default 200), ``--space FILE``, ``--zoo-root DIR``, ``--preset default|small``,
``--out DIR`` (default ``demo_out``), ``--study NAME``, ``--keep-study`` (resume instead of starting fresh),
``--n-jobs K`` (search processes sharing the study; default ``min(2, cores)``: each uses one torch thread).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("evomerge_opt.demo")

STUDY = "demo_ps_dfs"
COLUMNS = [("english", "English"), ("lang", "made-up"), ("math_en", "math (en)"),
           ("math_lang", "math (made-up)"), ("math_en_acc", "acc math (en)"), ("math_lang_acc", "acc math (made-up)")]


def _cli(*args: str) -> None:
    command = [sys.executable, "-m", "evomerge_opt.cli.main", *args]
    print("$ evo-merge " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ))


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    import evomerge_opt.dfs  # noqa: F401  registers the Evo*Affine classes: DFS outputs load without remote code

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def format_table(rows: list[tuple[str, dict[str, float]]], title: str) -> str:
    """A markdown table: one row per model, perplexity (lower is better) then accuracy columns."""
    head = "| model | " + " | ".join(f"ppl {name}" if not key.endswith("_acc") else name for key, name in COLUMNS) + " |"
    lines = [title, "", head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, scores in rows:
        cells = []
        for key, _ in COLUMNS:
            value = scores.get(key)
            if value is None:
                cells.append("-")
            elif key.endswith("_acc"):
                cells.append(f"{100 * value:.1f}%")
            else:
                cells.append(f"{value:,.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baseline_recipes(study_name: str, storage: str) -> dict[str, dict]:
    """``{baseline name: recipe}`` of the study's enqueued untuned baselines (TIES / DARE-TIES)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    out = {}
    for trial in study.get_trials(deepcopy=False):
        name = trial.user_attrs.get("baseline")
        if name and not name.startswith("source:") and "recipe" in trial.user_attrs:
            out[name] = trial.user_attrs["recipe"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evomerge_opt.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--space", default="search_spaces/ps_dfs.yaml")
    parser.add_argument("--zoo-root", type=Path, default=None)
    parser.add_argument("--preset", choices=["default", "small"], default="default",
                        help="Zoo preset (small: seconds, for tests; its numbers mean little).")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--study", default=STUDY)
    parser.add_argument("--keep-study", action="store_true", help="Resume the demo study instead of a fresh one.")
    parser.add_argument("--n-jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="Search worker processes sharing the study (default: min(2, CPU cores)).")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(1)
    from evomerge_opt.paths import zoo_root
    from evomerge_opt.search.storage import default_storage_url
    from evomerge_opt.zoo.build import build_zoo
    from evomerge_opt.zoo.scoring import score_model
    from evomerge_opt.zoo.settings import preset

    started = time.perf_counter()
    root = (args.zoo_root or zoo_root()).expanduser().resolve()
    os.environ["EVOMERGE_ZOO"] = str(root)  # zoo:NAME in the search space resolves here, in every child
    print(f"[1/4] pico zoo at {root} (built once, then cached)", flush=True)
    build_zoo(preset(args.preset), root=root)
    t_zoo = time.perf_counter() - started

    storage = default_storage_url(args.study)
    if not args.keep_study:
        for stale in (Path("studies") / f"{args.study}.db", Path("recipes") / f"best_{args.study}.yaml"):
            stale.unlink(missing_ok=True)
    print(f"[2/4] search: {args.trials} trials of {args.space} (study {args.study}, {storage})", flush=True)
    t = time.perf_counter()
    _cli("search", "--space", args.space, "--trials", str(args.trials), "--study", args.study,
         "--storage", storage, "--device", "cpu", "--n-jobs", str(args.n_jobs))
    t_search = time.perf_counter() - t

    print("[3/4] apply the best recipe and the untuned baselines", flush=True)
    from evomerge_opt.config.yamlio import save_yaml

    args.out.mkdir(parents=True, exist_ok=True)
    best = Path("recipes") / f"best_{args.study}.yaml"
    _cli("apply", str(best), "--out", str(args.out / "evolved"), "--overwrite")
    applied = {}
    for name, recipe in sorted(baseline_recipes(args.study, storage).items()):
        recipe_path = args.out / f"{name}.yaml"
        save_yaml(recipe, recipe_path)
        _cli("apply", str(recipe_path), "--out", str(args.out / name), "--overwrite")
        applied[name] = args.out / name

    print("[4/4] score every model on every held-out test set", flush=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    rows = []
    for name, path in [("base", root / "base"), ("math", root / "math"), ("lang", root / "lang"),
                       *[(f"{n} (untuned)", p) for n, p in applied.items()], ("evolved (PS+DFS)", args.out / "evolved")]:
        rows.append((name, score_model(_load(path), tokenizer, root, split="test")))
    total = time.perf_counter() - started
    table = format_table(rows, f"Held-out TEST sets (target: math in the made-up language); search {args.trials} "
                               f"trials in {t_search / 60:.1f} min, zoo {t_zoo / 60:.1f} min, total {total / 60:.1f} min")
    print("\n" + table + "\n", flush=True)
    (args.out / "table.md").write_text(table + "\n", encoding="utf-8")
    print(f"table written to {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
