"""What accuracy fitness costs on the pico zoo's target task (``math_lang``), measured against baselines.

Part ``generation`` (built): the generation the ``generate`` metric runs, against plain Hugging Face
generation on the SAME prompts (the target task's questions) and ``max_new_tokens``, all greedy:

* ours: :func:`evomerge_opt.fitness.generation.greedy_generate` — batched, left-padded, KV cache, head
  on the last position only, finished rows leave the batch;
* ``model.generate`` on the same left-padded batches;
* ``model.generate`` one prompt at a time (the plain loop).

The three run interleaved (A/B/C, then B/C/A, ...) ``--repeats`` times; each figure is the best of the
repeats, wall-clock and CPU seconds of this process (the steadier one on a shared machine). ``agree`` is
the share of prompts where ours writes exactly the plain loop's tokens. It also prints what one question
costs under each accuracy metric on the same questions (tokens and seconds per question): ``exact_match``
teacher-forced in one forward pass vs ``generate`` (greedy decoding + ``last_number``).

Part ``search`` (TODO — needs the search integration of issue 12, which wires ``FitnessEvaluator`` into
the study): evaluation tokens and seconds per trial and per 100 trials for full evaluation, median
pruning, successive halving (and IRT if built), at the best accuracy each reaches in the same budget;
target >= 5x fewer evaluation tokens than full evaluation at equal best accuracy. The functions below
mark where it goes; the script refuses ``--part search`` until then rather than print made-up numbers.

    .venv/bin/python benchmarks/fitness_cost.py                       # builds the default pico zoo once
    .venv/bin/python benchmarks/fitness_cost.py --preset small --prompts 24 --repeats 2
    .venv/bin/python benchmarks/fitness_cost.py --model zoo:math --max-new-tokens 8 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEARCH_ARMS = ("full", "median", "successive_halving", "irt")


def _zoo(args: argparse.Namespace) -> Path:
    from evomerge_opt.zoo.build import build_zoo
    from evomerge_opt.zoo.settings import preset

    root = Path(args.zoo_root or f"/tmp/evomerge_bench/zoo_{args.preset}")
    return build_zoo(preset(args.preset), root=root, progress=True)


def _records(root: Path, split: str, count: int) -> list[dict]:
    path = root / "data" / "math_lang" / f"{split}.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records[:count]


def generation_part(args: argparse.Namespace) -> dict:
    import torch

    from evomerge_opt.fitness.evaluator import FitnessEvaluator
    from evomerge_opt.fitness.generation import generation_throughput
    from evomerge_opt.pool import load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    root = _zoo(args)
    if args.model == "smollm2-135m-random":  # SmolLM2-135M's shape (vocab 49152): the head's real cost
        from evomerge_opt.zoo.random_models import SMOLLM2_135M, random_model

        model = random_model(SMOLLM2_135M.model_copy(update={"dtype": args.dtype}), seed=0).to(args.device)
        tokenizer = load_tokenizer(str(root / "base"))
    else:
        ref = args.model.replace("zoo:", str(root) + "/") if args.model.startswith("zoo:") else args.model
        model = load_causal_lm(ref, dtype=args.dtype, device=args.device)
        tokenizer = load_tokenizer(ref)
    records = _records(root, args.split, args.prompts)
    prompts = [r["prompt"] for r in records]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({n_params / 1e6:.2f}M parameters, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} thread(s)); {len(prompts)} prompts of math_lang/{args.split}; "
          f"max_new_tokens {args.max_new_tokens} ({'stop at EOS' if args.eos else 'no EOS: fixed length'}), "
          f"batch {args.batch_size}, repeats {args.repeats}")

    report = generation_throughput(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, repeats=args.repeats,
                                   eos_token_ids=None if args.eos else [])
    print(f"\n{'generation (greedy)':<34}{'wall s':>9}{'CPU s':>9}{'new tok':>9}{'tok/s':>10}{'tok/CPU-s':>11}")
    for way in ("ours_batched", "hf_generate_batched", "hf_generate_loop"):
        row = report[way]
        print(f"{way:<34}{row['seconds']:>9.3f}{row['cpu_seconds']:>9.3f}{row['new_tokens']:>9}"
              f"{row['tokens_per_second']:>10,.0f}{row['tokens_per_cpu_second']:>11,.0f}")
    print(f"ours vs model.generate batched: {report['speedup_vs_hf_batched']:.2f}x wall, "
          f"{report['cpu_speedup_vs_hf_batched']:.2f}x CPU; vs the one-prompt loop: "
          f"{report['speedup_vs_hf_loop']:.2f}x wall, {report['cpu_speedup_vs_hf_loop']:.2f}x CPU; "
          f"same tokens as the loop on {report['agree']:.0%} of prompts")

    # What one question costs under each accuracy metric (same questions, same model).
    data = Path(root) / "data" / "math_lang" / f"{args.split}.jsonl"
    specs = [{"name": "exact_match", "path": str(data), "metric": "exact_match", "answer_suffix": ".",
              "num_samples": len(prompts)},
             {"name": "generate", "path": str(data), "metric": "generate", "max_new_tokens": args.max_new_tokens,
              "stop": ["."], "num_samples": len(prompts)}]
    costs = {}
    for spec in specs:
        evaluator = FitnessEvaluator.from_specs([spec], tokenizer, batch_size=args.batch_size, device=args.device)
        best = None
        for _ in range(args.repeats):
            cpu = time.process_time()
            result = evaluator.evaluate(model)
            cpu = time.process_time() - cpu
            if best is None or result.seconds < best[0].seconds:
                best = (result, cpu)
        result, cpu = best
        score = result.per_dataset[spec["name"]]
        costs[spec["name"]] = {"accuracy": score.value, "extracted": score.extracted, "tokens": result.tokens,
                               "seconds": result.seconds, "cpu_seconds": cpu, "questions": score.n}
    print("\n(the target task's metric cost, EOS and stop strings on; an extraction rate of 0 is warned about)")
    print(f"{'metric (per question)':<22}{'accuracy':>10}{'extracted':>11}{'tokens':>9}{'ms':>9}{'CPU ms':>9}")
    for name, c in costs.items():
        q = c["questions"]
        print(f"{name:<22}{c['accuracy']:>10.3f}{c['extracted']:>11.3f}{c['tokens'] / q:>9.1f}"
              f"{1000 * c['seconds'] / q:>9.2f}{1000 * c['cpu_seconds'] / q:>9.2f}")
    return {"generation": report, "metric_cost": costs, "model": args.model, "device": args.device,
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------- search (TODO)


def search_arm(arm: str, args: argparse.Namespace) -> dict:
    """One search of ``args.trials`` trials on ``search_spaces/ps_dfs_accuracy.yaml`` with pruner ``arm``.

    TODO(issue 12, search integration): run the study with ``FitnessEvaluator.from_section(space.fitness)``
    as the objective (``full``: pruner none; ``median``: MedianPruner on the running accuracy;
    ``successive_halving``: Optuna's SuccessiveHalvingPruner fed batch by batch; ``irt``: if built), the
    same sampler and seed for every arm, and return {trials, pruned, tokens (sum of trial
    ``user_attrs['tokens']``), eval_seconds, best_accuracy, tokens_to_best}. Then print tokens and seconds
    per trial and per 100 trials per arm, and the ratio full / arm at equal best accuracy (target >= 5x).
    """
    raise NotImplementedError(
        "the search part needs the fitness evaluator wired into the search (issue 12, search integration); "
        "run --part generation meanwhile"
    )


def search_part(args: argparse.Namespace) -> dict:
    return {arm: search_arm(arm, args) for arm in SEARCH_ARMS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("generation", "search"), default="generation")
    parser.add_argument("--preset", default="default", help="Pico zoo preset (default | small).")
    parser.add_argument("--zoo-root", default=None, help="Zoo folder (default /tmp/evomerge_bench/zoo_<preset>).")
    parser.add_argument("--model", default="zoo:math",
                        help="Model to generate with: zoo:NAME, a path, or smollm2-135m-random (a random model of "
                             "SmolLM2-135M's shape with the zoo's tokenizer).")
    parser.add_argument("--eos", action="store_true",
                        help="Stop rows at EOS in the throughput part (default: every row decodes max_new_tokens, "
                             "so the three ways do the same work).")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--trials", type=int, default=100, help="(search part) trials per arm.")
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    args = parser.parse_args()
    if args.part == "search":
        try:
            out = search_part(args)
        except NotImplementedError as exc:
            print(f"not measured: {exc}", file=sys.stderr)
            return 2
    else:
        out = generation_part(args)
    if args.json:
        from evomerge_opt.io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
