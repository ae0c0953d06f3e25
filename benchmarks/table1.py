"""Sakana's Table 1 in miniature, on the pico zoo: sources, untuned baselines, evolved PS, DFS and PS+DFS.

    .venv/bin/python benchmarks/table1.py --trials 200 --out benchmarks/results/table1.md

For each of ``search_spaces/ps.yaml``, ``dfs.yaml`` and ``ps_dfs.yaml`` a fresh study ``table1_<space>``
(SQLite under ``studies/``) runs ``--trials`` trials with the target task's dev set as fitness; its best
recipe is applied and scored, beside the sources (base, math, lang) and the untuned TIES / DARE-TIES
baselines (density 0.5), with perplexity and answer accuracy on every held-out TEST set. The trial
budget and wall time of each search are in the table, and the last column is the ratio of the target
perplexity to the best source's, measured in the same run (below 1: the merge beats every source).
The markdown goes to stdout and to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SPACES = (("evolved PS", "search_spaces/ps.yaml"), ("evolved DFS", "search_spaces/dfs.yaml"),
          ("evolved PS+DFS", "search_spaces/ps_dfs.yaml"))
COLUMNS = [("english", "ppl English"), ("lang", "ppl made-up"), ("math_en", "ppl math (en)"),
           ("math_lang", "ppl math (made-up)"), ("math_en_acc", "acc math (en)"),
           ("math_lang_acc", "acc math (made-up)")]


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if key.endswith("_acc") else f"{value:,.2f}"


def render(rows: list[dict], trials: int) -> str:
    best_source = min(r["scores"]["math_lang"] for r in rows if r["kind"] == "source")
    head = ["model", "kind"] + [name for _, name in COLUMNS] + ["target ppl / best source", "trials", "search time"]
    lines = [
        "Pico zoo, held-out TEST sets; target task: arithmetic posed in the made-up language (math_lang).",
        "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["name"], r["kind"]] + [_cell(k, r["scores"].get(k)) for k, _ in COLUMNS]
        cells.append(f"{r['scores']['math_lang'] / best_source:.3f}")
        cells.append(str(r.get("trials", "-")))
        cells.append(f"{r['seconds'] / 60:.1f} min" if "seconds" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", (f"Searches: {trials} trials each (baselines included), fitness = perplexity on "
                   "zoo:data/math_lang/dev.jsonl; the test sets are scored only after the search.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="Trials per search (default 200).")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/table1.md"))
    parser.add_argument("--work", type=Path, default=None, help="Where merged models go (default: a temp dir).")
    parser.add_argument("--zoo-root", type=Path, default=None)
    parser.add_argument("--spaces", nargs="*", default=None, help="Subset of: ps dfs ps_dfs.")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from evomerge_opt.config.yamlio import save_yaml
    from evomerge_opt.demo import _cli, _load, baseline_recipes
    from evomerge_opt.paths import zoo_root
    from evomerge_opt.search.storage import default_storage_url
    from evomerge_opt.zoo.build import build_zoo
    from evomerge_opt.zoo.scoring import score_model

    if args.work is None:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="table1_"))
    root = (args.zoo_root or zoo_root()).expanduser().resolve()
    os.environ["EVOMERGE_ZOO"] = str(root)
    build_zoo(root=root)
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    rows: list[dict] = []
    for name in ("base", "math", "lang"):
        rows.append({"name": name, "kind": "source", "scores": score_model(_load(root / name), tokenizer, root)})
        print(f"scored {name}: {rows[-1]['scores']}", flush=True)

    wanted = [(label, path) for label, path in SPACES if args.spaces is None or Path(path).stem in args.spaces]
    baselines_done = False
    for label, space in wanted:
        study = f"table1_{Path(space).stem}"
        storage = default_storage_url(study)
        for stale in (Path("studies") / f"{study}.db", Path("recipes") / f"best_{study}.yaml"):
            stale.unlink(missing_ok=True)
        t = time.perf_counter()
        _cli("search", "--space", space, "--trials", str(args.trials), "--study", study, "--storage", storage,
             "--device", "cpu", "--no-progress")
        seconds = time.perf_counter() - t
        out_dir = args.work / study
        _cli("apply", str(Path("recipes") / f"best_{study}.yaml"), "--out", str(out_dir), "--overwrite")
        if not baselines_done:
            for base_name, recipe in sorted(baseline_recipes(study, storage).items()):
                recipe_path = args.work / f"{base_name}.yaml"
                save_yaml(recipe, recipe_path)
                _cli("apply", str(recipe_path), "--out", str(args.work / base_name), "--overwrite")
                rows.append({"name": f"{base_name} (untuned)", "kind": "baseline",
                             "scores": score_model(_load(args.work / base_name), tokenizer, root)})
                baselines_done = True
        rows.append({"name": label, "kind": "evolved", "trials": args.trials, "seconds": seconds,
                     "scores": score_model(_load(out_dir), tokenizer, root)})
        print(f"{label}: {rows[-1]['scores']} ({seconds / 60:.1f} min)", flush=True)

    table = render(rows, args.trials)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from evomerge_opt.io.atomic import atomic_write_text

    atomic_write_text(args.out, table + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
