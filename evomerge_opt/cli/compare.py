"""`evo-merge compare --base B --finetuned A B --calibration DATA... [--eval DATA...] --density 0.2 --output-dir DIR`.

Merges the fine-tunes with TIES-Magnitude, DARE-Random, TIES-SparseGPT and DARE-SparseGPT, saves each
merged model under ``DIR/<method>/``, prints the table (method, perplexity, average loss, time) and
writes ``DIR/comparison_results.json``.
"""

from __future__ import annotations

import argparse

METHOD_KEYS = ("ties_magnitude", "dare_random", "ties_sparsegpt", "dare_sparsegpt", "ties_sparsegpt_obs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", "--base_model", dest="base", required=True, help="Base model (path, zoo:NAME, hub id).")
    parser.add_argument("--finetuned", "--finetuned_models", dest="finetuned", nargs="+", required=True,
                        help="Fine-tuned models (full models or LoRA adapter directories) of the base.")
    parser.add_argument("--calibration", "--datasets", dest="calibration", nargs="+", required=True,
                        help="Calibration data for the SparseGPT Hessians: files (.txt/.jsonl/.json/.csv/.parquet) "
                             "or zoo:data/...; NAME=PATH and PATH@WEIGHT are accepted.")
    parser.add_argument("--eval", dest="eval", nargs="+", default=None,
                        help="Evaluation data (same forms; default: the calibration data, in-sample).")
    parser.add_argument("--density", type=float, default=0.2, help="Fraction of each task vector kept (default 0.2).")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default="./merged_models",
                        help="Where the merged models and comparison_results.json go.")
    parser.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                        help="Cache root (hessians/, task_vectors/, windows/); default: evo-merge's cache.")
    parser.add_argument("--num-calibration-samples", "--num_calibration_samples", dest="num_calibration_samples",
                        type=int, default=128, help="Calibration rows in all (default 128).")
    parser.add_argument("--calibration-seq-len", dest="calibration_seq_len", type=int, default=512,
                        help="Tokens per calibration row at most (default 512).")
    parser.add_argument("--eval-num-samples", dest="eval_num_samples", type=int, default=200,
                        help="Evaluation rows per dataset at most (default 200).")
    parser.add_argument("--eval-seq-len", dest="eval_seq_len", type=int, default=512,
                        help="Tokens per evaluation row at most (default 512).")
    parser.add_argument("--calibration-mode", choices=("auto", "paired", "shared"), default="auto",
                        help="paired: fine-tune i is calibrated on calibration dataset i only; shared: every "
                             "fine-tune on the mix; auto (default): paired when there is one dataset per fine-tune.")
    parser.add_argument("--criterion", choices=("sparsegpt", "wanda"), default="sparsegpt",
                        help="Importance: sparsegpt = d^2/diag(U)^2 (default); wanda = d^2*diag(H).")
    parser.add_argument("--methods", nargs="+", choices=METHOD_KEYS, default=list(METHOD_KEYS[:4]),
                        help="Methods to run (default: the first four; ties_sparsegpt_obs adds SparseGPT's "
                             "error-compensating update and keeps full Hessians on disk).")
    parser.add_argument("--dare-method", choices=("dare_linear", "dare_ties"), default="dare_linear",
                        help="Merge used by the DARE rows (default dare_linear).")
    parser.add_argument("--dare-rescale", choices=("inverse_density", "l1", "none"), default="inverse_density",
                        help="DARE-Random's rescale of the kept entries (default inverse_density).")
    parser.add_argument("--dare-sparsegpt-rescale", choices=("inverse_density", "l1", "none"), default="l1",
                        help="DARE-SparseGPT's rescale (default l1: its top-k is not a random draw).")
    parser.add_argument("--baselines", action="store_true", help="Also score the base and every fine-tune.")
    parser.add_argument("--no-save", action="store_true", help="Do not save the merged models (scores only).")
    parser.add_argument("--batch-size", type=int, default=8, help="Batch size for Hessians and evaluation.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
    parser.add_argument("--dtype", default="float32", help="dtype of the merged models (default float32).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of DARE's random masks.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's).")


def run(args: argparse.Namespace) -> int:
    from evomerge_opt.data.spec import parse_data_arg
    from evomerge_opt.fitness.compare import MergeComparison, format_table

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    calibration = [parse_data_arg(text) for text in args.calibration]
    eval_data = [parse_data_arg(text) for text in args.eval] if args.eval else None
    comparison = MergeComparison(
        args.base, args.finetuned, calibration, output_dir=args.output_dir, cache_dir=args.cache_dir,
        density=args.density, num_calibration_samples=args.num_calibration_samples,
        calibration_seq_length=args.calibration_seq_len, device=args.device, eval_data=eval_data,
        eval_num_samples=args.eval_num_samples, eval_seq_length=args.eval_seq_len, batch_size=args.batch_size,
        seed=args.seed, dtype=args.dtype, dare_method=args.dare_method, dare_rescale=args.dare_rescale,
        dare_sparsegpt_rescale=args.dare_sparsegpt_rescale, criterion=args.criterion,
        pair_calibration={"auto": None, "paired": True, "shared": False}[args.calibration_mode],
        save_models=not args.no_save,
    )
    results = comparison.merge_all_methods(args.methods, include_sources=args.baselines)
    print(format_table(results, comparison.last_payload.get("sources")))
    best = min(results, key=lambda key: results[key]["perplexity"])
    print(f"\nBest: {results[best]['method']} (perplexity {results[best]['perplexity']:.4f})")
    print(f"Results: {comparison.output_dir / 'comparison_results.json'}")
    return 0
