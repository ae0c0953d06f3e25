"""``evo-merge apply RECIPE --out DIR``: build a merged model directory from a PS or DFS recipe."""

from __future__ import annotations

import argparse
import gc
import time

# When run() returns, the output directory is complete and renamed into place and no thread or file
# is left open, so the console script may skip interpreter teardown (see cli.main.console).
FAST_EXIT = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="Recipe YAML: parameter-space (merge_method: ...) or data-flow-space (layer_mask: ...).")
    parser.add_argument("--out", required=True, help="Output model directory (written atomically).")
    parser.add_argument("--device", default="cpu", help="Device to merge on: cpu (default), cuda or cuda:N.")
    parser.add_argument("--dtype", default=None, help="Output dtype (float32, bfloat16, float16); default: the recipe's, else the base's.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it exists (only once the new one is complete).")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest safetensors shard, e.g. 2GB or 500MB (default 5GB).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.add_argument("--format", choices=("evo", "plain"), default="evo",
                        help="DFS recipes only: evo (default: the portable Evo*Affine model, any recipe) or plain "
                             "(a standard Llama/Mistral, one layer per hop, scalar scales folded in; no remote code).")


def run(args: argparse.Namespace) -> int:
    from evomerge_opt.api import apply_recipe, check_output_format
    from evomerge_opt.config.recipe import PSRecipe, load_recipe

    started = time.perf_counter()
    recipe = load_recipe(args.recipe)
    check_output_format(recipe, args.format)
    ahead = None
    if isinstance(recipe, PSRecipe):
        from evomerge_opt.merge import prepass  # numpy only: forks before torch is imported

        ahead = prepass.start(recipe) if args.device == "cpu" else None
        _import_merge_engine()  # imports torch while the pre-pass runs
        kind = f"{recipe.merge_method} merge of {len(recipe.models)} model(s)"
    else:
        kind = f"data-flow-space merge, {args.format} format"
    out = apply_recipe(
        recipe, args.out, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size, progress=not args.no_progress,
        known_topk=ahead.result() if ahead is not None else None, format=args.format,
    )
    weights = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    print(f"Wrote {out} ({kind}; {len(weights)} safetensors file(s), {size / 1e6:.1f} MB) "
          f"in {time.perf_counter() - started:.1f}s")
    return 0


def _import_merge_engine() -> None:
    """Import the merge engine (and torch) without garbage collection, then freeze what it loaded.

    Importing torch allocates about a million objects, none of them garbage, and the collector
    scans them again and again meanwhile (~0.1 s). Frozen afterwards, they are never scanned again,
    and forked merge workers do not copy their pages by touching them for a collection.
    """
    gc.disable()
    try:
        import evomerge_opt.merge.engine  # noqa: F401
    finally:
        gc.enable()
    gc.freeze()
