"""`evo-merge eval MODEL_OR_RECIPE [--data ...] [--lm-eval TASK ...]`: each dataset's value in its own unit.

MODEL_OR_RECIPE is a model (directory, ``zoo:NAME``, hub id, LoRA adapter) or a recipe YAML (PS or DFS),
which is merged in memory first. A PS recipe with ``sparsify: sparsegpt`` takes its calibration data
from the recipe's ``calibration:`` or from ``--calibration``.

``--data`` (repeatable) takes:

* ``PATH``, ``NAME=PATH``, ``PATH@WEIGHT``: perplexity on the file (as before);
* a YAML mapping of one fitness dataset entry, e.g.
  ``--data "{path: zoo:data/math_lang/test.jsonl, metric: exact_match, answer_suffix: '.'}"``;
* a ``.yaml``/``.yml`` file holding a list of entries, or a fitness section (``datasets:``,
  ``lm_eval:``, ``batch_size:``, ``multi_objective:``) — e.g. a search space's ``fitness:`` copied out.

``--lm-eval TASK`` (repeatable; ``--lm-eval-include DIR`` for tasks of your own, ``--limit N`` for the
first N documents, ``--lm-eval-metric acc_norm``) scores lm-evaluation-harness tasks on the in-memory
model: the numbers are those ``lm_eval --model hf --model_args pretrained=DIR`` prints for the applied
directory. Every dataset and task is read and checked before the model loads.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODEL_OR_RECIPE", help="Model reference or recipe YAML (.yml/.yaml).")
    parser.add_argument("--data", action="append", default=[],
                        help="Evaluation data (repeatable): a file (.txt/.jsonl/.json/.csv/.parquet) or zoo:data/... "
                             "for perplexity (NAME=PATH and PATH@WEIGHT accepted); a YAML mapping of a dataset entry "
                             "('{path: qa.jsonl, metric: exact_match}'); or a .yaml file with a list of entries or a "
                             "fitness section.")
    parser.add_argument("--lm-eval", dest="lm_eval", action="append", default=[], metavar="TASK",
                        help="An lm-evaluation-harness task to score (repeatable; needs evomerge-opt[lmeval]).")
    parser.add_argument("--lm-eval-include", dest="lm_eval_include", default=None, metavar="DIR",
                        help="Folder of lm-eval task YAMLs (lm-eval's --include_path).")
    parser.add_argument("--lm-eval-metric", dest="lm_eval_metric", default="acc",
                        help="Metric of the --lm-eval tasks (default acc; e.g. acc_norm, exact_match).")
    parser.add_argument("--limit", type=int, default=None, help="First N documents of each --lm-eval task.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per row at most (perplexity; default 256).")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--num-samples", type=int, default=None, help="Rows (questions) per dataset at most.")
    limit.add_argument("--max-tokens", type=int, default=None, help="Tokens per perplexity dataset at most.")
    parser.add_argument("--packing", action="store_true",
                        help="Pack documents into full windows (perplexity; default: one document per row).")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows (questions, documents) per batch (default 8).")
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


_SECTION_KEYS = {"datasets", "lm_eval", "batch_size", "multi_objective"}


def collect_fitness(args: argparse.Namespace) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """``(dataset specs, lm-eval specs, settings)`` from ``--data``/``--lm-eval`` (schema checked; no model)."""
    import os

    import yaml

    from evomerge_opt.config.yamlio import load_yaml
    from evomerge_opt.data.spec import parse_data_arg
    from evomerge_opt.errors import ConfigError
    from evomerge_opt.fitness.checks import parse_fitness_dataset
    from evomerge_opt.fitness.spec import parse_lm_eval_task

    defaults = {"seq_len": args.seq_len, "num_samples": args.num_samples, "max_tokens": args.max_tokens}
    if args.packing:
        defaults["packing"] = True
    datasets: list[Any] = []
    lm_eval: list[Any] = []
    settings: dict[str, Any] = {}
    for text in args.data:
        if text.lstrip().startswith("{"):
            try:
                entry = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"`--data {text}` is not a valid YAML mapping: {exc}") from None
            datasets.append(parse_fitness_dataset(entry, **defaults))
        elif text.lower().endswith((".yml", ".yaml")) and os.path.isfile(text):
            content = load_yaml(text)
            if isinstance(content, dict) and "datasets" not in content and "lm_eval" not in content:
                content = [content]  # one entry
            if isinstance(content, dict):
                unknown = sorted(set(content) - _SECTION_KEYS)
                if unknown:
                    raise ConfigError(f"{text!r}: unknown fitness key(s) {unknown}; valid keys are: "
                                      f"{', '.join(sorted(_SECTION_KEYS))}.")
                entries, tasks = content.get("datasets") or [], content.get("lm_eval") or []
                settings.update({k: content[k] for k in ("batch_size", "multi_objective") if k in content})
            elif isinstance(content, list):
                entries, tasks = content, []
            else:
                raise ConfigError(f"{text!r} must hold a list of dataset entries or a fitness section, but holds "
                                  f"{type(content).__name__}.")
            datasets.extend(parse_fitness_dataset(e, **defaults) for e in entries)
            lm_eval.extend(parse_lm_eval_task(t) for t in tasks)
        else:
            datasets.append(parse_fitness_dataset(parse_data_arg(text, **defaults)))
    for task in args.lm_eval:
        entry: dict[str, Any] = {"task": task, "metric": args.lm_eval_metric}
        if args.lm_eval_include:
            entry["include_path"] = args.lm_eval_include
        if args.limit is not None:
            entry["limit"] = args.limit
        lm_eval.append(parse_lm_eval_task(entry))
    if args.limit is not None:
        lm_eval = [t if t.limit is not None else t.model_copy(update={"limit": args.limit}) for t in lm_eval]
    if not datasets and not lm_eval:
        raise ConfigError("Nothing to evaluate: give --data and/or --lm-eval.")
    return datasets, lm_eval, settings


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from evomerge_opt.data.spec import parse_data_arg
    from evomerge_opt.errors import ConfigError
    from evomerge_opt.fitness.checks import fitness_problems
    from evomerge_opt.fitness.compare import default_device
    from evomerge_opt.fitness.evaluator import FitnessEvaluator
    from evomerge_opt.io.atomic import atomic_write_text
    from evomerge_opt.pool import load_causal_lm, load_tokenizer

    # Everything about the data is checked before a model (or even the tokenizer) loads.
    datasets, lm_eval, settings = collect_fitness(args)
    problems = fitness_problems(datasets, lm_eval, check_data=True)
    if problems:
        raise ConfigError("the evaluation data cannot be scored:", problems)

    device = args.device or default_device()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    target = Path(args.target)
    raw = None
    if target.suffix.lower() in (".yml", ".yaml"):
        from evomerge_opt.config.yamlio import load_yaml

        raw = load_yaml(target)
        if not isinstance(raw, dict):
            raise ConfigError(f"Recipe {str(target)!r} must be a mapping, but holds {type(raw).__name__}.")
        tokenizer = load_tokenizer(args.tokenizer or _recipe_tokenizer_ref(raw))
    else:
        tokenizer = load_tokenizer(args.tokenizer or args.target)
    evaluator = FitnessEvaluator.from_specs(
        datasets, tokenizer, lm_eval=lm_eval, batch_size=settings.get("batch_size", args.batch_size),
        multi_objective=bool(settings.get("multi_objective", False)), device=device)

    if raw is not None:
        from evomerge_opt.api import merge_recipe
        from evomerge_opt.merge.sparsify.importance import importance_from_recipe

        importance = None
        if "merge_method" in raw:
            calibration = [parse_data_arg(t) for t in args.calibration] if args.calibration else None
            importance = importance_from_recipe(raw, device=device, calibration=calibration)
            raw = {k: v for k, v in raw.items() if k != "calibration"}
        model = merge_recipe(raw if "merge_method" in raw else target, device=device, dtype=args.dtype,
                             importance=importance)
    else:
        model = load_causal_lm(args.target, dtype=args.dtype, device=device)

    from tqdm.auto import tqdm

    # A bar on a terminal (disable=None: off when stderr is not a TTY, e.g. in logs and tests).
    with tqdm(total=evaluator.num_batches, desc="eval", unit="batch", disable=None) as bar:
        result = evaluator.evaluate(model, on_batch=lambda step, running: bar.update(1))
    width = max(12, *(len(name) + 2 for name in result.per_dataset))
    metric_width = max(12, *(len(r.metric) + 2 for r in result.per_dataset.values()))
    print(f"{'dataset':<{width}}{'metric':<{metric_width}}{'value':>12}{'n':>8}{'extracted':>11}{'tokens':>10}")
    for name, score in result.per_dataset.items():
        extracted = "-" if score.extracted is None else f"{score.extracted:.3f}"
        print(f"{name:<{width}}{score.metric:<{metric_width}}{_fmt(score.value, score.metric):>12}{score.n:>8}"
              f"{extracted:>11}{score.tokens:>10}")
    if len(result.per_dataset) > 1 or result.objective_names[0] == "cost":
        for objective, value, direction in zip(result.objective_names, result.values, result.directions):
            label = "aggregate" if not evaluator.multi_objective else f"objective {objective}"
            print(f"{label:<{width}}{objective:<{metric_width}}{value:>12.4f}   ({direction})")
    for warning in result.warnings:
        print(f"warning: {warning}")
    rate = result.tokens / result.seconds if result.seconds > 0 else float("inf")
    print(f"{result.tokens} tokens in {result.seconds:.2f}s ({rate:,.0f} tokens/s on {device})")
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps({"target": args.target, **result.to_dict()}, indent=2) + "\n")
    return 0
