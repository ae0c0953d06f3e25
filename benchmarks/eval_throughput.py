"""Evaluator throughput (scored tokens per second) on a SmolLM2-135M-shaped random model, fp32 vs bf16.

Baseline measured in the same run: the usual Hugging Face loop (``model(input_ids, labels=...)`` on
each batch, fp32), which computes the mean loss on the model's side. The evaluator computes the exact
token-weighted loss in float32 itself; the ratios show what that costs or saves, and what bf16 gives.

Rows are full windows of ``--seq-len`` random tokens (content does not change the cost), so no padding.
Besides wall-clock tokens/s it prints tokens per CPU-second of this process, which stays meaningful on
a machine shared with other jobs (wall-clock throughput then depends on the load).

    .venv/bin/python benchmarks/eval_throughput.py [--batches 3] [--batch-size 4] [--seq-len 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from evomerge_opt.data.windows import TokenWindows
    from evomerge_opt.fitness.perplexity import PerplexityEvaluator
    from evomerge_opt.zoo.random_models import SMOLLM2_135M, random_model

    spec = SMOLLM2_135M.model_copy(update={"dtype": "float32"})
    model = random_model(spec, seed=0).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    rows = args.batches * args.batch_size
    ids = torch.randint(0, spec.vocab_size, (rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    windows = TokenWindows(ids, torch.ones_like(ids, dtype=torch.bool), "random")
    evaluator = PerplexityEvaluator([("random", windows, 1.0)], batch_size=args.batch_size, device=args.device)
    scored = windows.num_predicted
    print(f"model: SmolLM2-135M shape, {n_params / 1e6:.1f}M parameters, device {args.device}, "
          f"{torch.get_num_threads()} thread(s); {args.batches} batches x {args.batch_size} x {args.seq_len} tokens")

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    # Baseline: HF loss inside the model, fp32.
    with torch.inference_mode():
        model(input_ids=ids[:1, :16])  # warm-up
        sync()
        cpu_start = time.process_time()
        start = time.perf_counter()
        for b in range(args.batches):
            batch = ids[b * args.batch_size:(b + 1) * args.batch_size].to(args.device)
            model(input_ids=batch, labels=batch).loss.item()
        sync()
    base_seconds = time.perf_counter() - start
    base_tps = scored / base_seconds
    base_cpu_tps = scored / (time.process_time() - cpu_start)
    print(f"{'':<36}{'tokens/s':>12}{'ratio':>8}{'tokens/CPU-s':>14}{'ratio':>8}")
    print(f"{'HF model(labels=) fp32 (baseline)':<36}{base_tps:>12,.0f}{1.0:>8.2f}{base_cpu_tps:>14,.0f}{1.0:>8.2f}")

    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        model = model.to(dtype)
        evaluator.evaluate(model, max_batches=1)  # warm-up
        sync()
        cpu_start = time.process_time()
        result = evaluator.evaluate(model)
        sync()
        cpu_tps = result.tokens / (time.process_time() - cpu_start)
        print(f"{'PerplexityEvaluator ' + dtype_name:<36}{result.tokens_per_second:>12,.0f}"
              f"{result.tokens_per_second / base_tps:>8.2f}{cpu_tps:>14,.0f}{cpu_tps / base_cpu_tps:>8.2f}"
              f"   (ppl {result.perplexity:,.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
