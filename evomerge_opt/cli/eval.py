"""`evo-merge eval MODEL_OR_RECIPE --data PATH [--data ...]`: perplexity per dataset.

MODEL_OR_RECIPE is a model (directory, ``zoo:NAME``, hub id, LoRA adapter) or a recipe YAML (PS or DFS),
which is merged in memory first. A PS recipe with ``sparsify: sparsegpt`` takes its calibration data
from the recipe's ``calibration:`` or from ``--calibration``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODEL_OR_RECIPE", help="Model reference or recipe YAML (.yml/.yaml).")
    parser.add_argument("--data", action="append", required=True,
                        help="Evaluation data (repeatable): a file (.txt/.jsonl/.json/.csv/.parquet) or "
                             "zoo:data/...; NAME=PATH and PATH@WEIGHT are accepted.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per row at most (default 256).")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--num-samples", type=int, default=None, help="Rows per dataset at most.")
    limit.add_argument("--max-tokens", type=int, default=None, help="Tokens per dataset at most.")
    parser.add_argument("--packing", action="store_true",
                        help="Pack documents into full windows (default: one document per row).")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per batch (default 8).")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available).")
    parser.add_argument("--dtype", default=None, help="Load/merge dtype (default: the checkpoint's).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer reference (default: the model's/recipe's).")
    parser.add_argument("--calibration", nargs="+", default=None,
                        help="Calibration data for a recipe with sparsify: sparsegpt.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's).")
    parser.add_argument("--json", dest="json_out", default=None, help="Also write the result as JSON here.")


def _recipe_tokenizer_ref(raw: dict) -> str:
    if "merge_method" in raw:
        source = raw.get("tokenizer_source")
        if source and source != "base":
            return source
        if raw.get("base_model"):
            return raw["base_model"]
        first = (raw.get("models") or [None])[0]
        return first.get("model") if isinstance(first, dict) else first
    paths = raw.get("model_paths") or []
    index = raw.get("input_layer_model", 0)
    return paths[index if isinstance(index, int) and index < len(paths) else 0]


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from evomerge_opt.data.spec import parse_data_arg
    from evomerge_opt.errors import ConfigError
    from evomerge_opt.fitness.compare import default_device
    from evomerge_opt.fitness.perplexity import PerplexityEvaluator
    from evomerge_opt.io.atomic import atomic_write_text
    from evomerge_opt.pool import load_causal_lm, load_tokenizer

    device = args.device or default_device()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    target = Path(args.target)
    if target.suffix.lower() in (".yml", ".yaml"):
        from evomerge_opt.api import merge_recipe
        from evomerge_opt.config.yamlio import load_yaml
        from evomerge_opt.merge.sparsify.importance import importance_from_recipe

        raw = load_yaml(target)
        if not isinstance(raw, dict):
            raise ConfigError(f"Recipe {str(target)!r} must be a mapping, but holds {type(raw).__name__}.")
        importance = None
        if "merge_method" in raw:
            calibration = [parse_data_arg(t) for t in args.calibration] if args.calibration else None
            importance = importance_from_recipe(raw, device=device, calibration=calibration)
            raw = {k: v for k, v in raw.items() if k != "calibration"}
        tokenizer = load_tokenizer(args.tokenizer or _recipe_tokenizer_ref(raw))
        model = merge_recipe(raw if "merge_method" in raw else target, device=device, dtype=args.dtype,
                             importance=importance)
    else:
        tokenizer = load_tokenizer(args.tokenizer or args.target)
        model = load_causal_lm(args.target, dtype=args.dtype, device=device)

    defaults = {"seq_len": args.seq_len, "num_samples": args.num_samples, "max_tokens": args.max_tokens}
    if args.packing:
        defaults["packing"] = True
    specs = [parse_data_arg(text, **defaults) for text in args.data]
    evaluator = PerplexityEvaluator.from_specs(specs, tokenizer, batch_size=args.batch_size, device=device)
    result = evaluator.evaluate(model)
    width = max(12, *(len(name) for name in result.per_dataset))
    print(f"{'dataset':<{width}}{'perplexity':>14}{'loss':>10}{'tokens':>10}")
    for name, score in result.per_dataset.items():
        print(f"{name:<{width}}{score.perplexity:>14.4f}{score.loss:>10.4f}{score.tokens:>10}")
    if len(result.per_dataset) > 1:
        print(f"{'aggregate':<{width}}{result.perplexity:>14.4f}{result.loss:>10.4f}{result.tokens:>10}")
    print(f"{result.tokens} tokens in {result.seconds:.2f}s ({result.tokens_per_second:,.0f} tokens/s on {device})")
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps({"target": args.target, **result.to_dict()}, indent=2) + "\n")
    return 0
