"""TIES/DARE with SparseGPT importance vs magnitude/random trimming, on real fine-tunes of one base.

Seeds 001/004 claim SparseGPT trimming gives "5-10% better perplexity". This script measures it.

Models, either
* ``--zoo``: the pico zoo (``zoo:base`` and its specialists ``zoo:math`` / ``zoo:lang``; calibration
  on the specialists' dev data, evaluation on each task's test data), or
* by default: a small family trained here in a few minutes on the CPU (cached in ``--workdir``): a
  4-layer Llama (hidden 128) pre-trained on English docstrings of the Python standard library, then
  fully fine-tuned into two specialists: ``math`` (arithmetic questions in words with answers) and
  ``rev`` (the same English with every word spelled backwards, a "new language"). Calibration: a
  mix of both specialists' training data; evaluation: each task's held-out test set.
  (``--zoo``: calibration on ``math_en``/``lang`` train data, evaluation on their test sets and on the
  target task ``math_lang``.)

For every density it merges the two specialists (weights 1, normalised) with TIES-Magnitude,
DARE-Random, and TIES/DARE with SparseGPT importance (calibration: the mix of both tasks for every
fine-tune, or each fine-tune on its own task's data), plus two variants: the Wanda-style score
``d^2 * diag(H)`` and SparseGPT with its OBS error-compensating update. It prints perplexity per task,
their geometric mean, and each row's ratio to TIES-Magnitude measured in the same run.

    .venv/bin/python benchmarks/sparsegpt_vs_magnitude.py [--zoo] [--densities 0.2 0.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


# ------------------------------------------------------------------------- synthetic family


def _docstrings(limit: int) -> list[str]:
    """Paragraphs of English from the standard library's docstrings (first 40 words of each)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    words = "".join(c if c.isalpha() or c in " .,'" else " " for c in doc.lower()).split()
                    if len(words) >= 8:
                        out.append(" ".join(words[:40]))
        if len(out) >= limit:
            break
    return out[:limit]


def _arithmetic(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        a, b = rng.randrange(11), rng.randrange(11)
        if rng.random() < 0.5:
            out.append(f"what is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}? the answer is {NUMBER_WORDS[a + b]}.")
        else:
            a, b = max(a, b), min(a, b)
            out.append(f"what is {NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]}? the answer is {NUMBER_WORDS[a - b]}.")
    return out


def _reverse_words(text: str) -> str:
    return " ".join(word[::-1] for word in text.split())


def _train(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int, seq_len: int = 64,
           batch_size: int = 16) -> float:
    """Plain AdamW on packed windows of ``texts``; returns the last loss."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    stream = torch.tensor(ids)
    windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def _write_jsonl(path: Path, texts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def build_synthetic_family(workdir: Path, base_steps: int, ft_steps: int, seed: int = 0) -> dict:
    """Train (or reuse) base + two specialists; returns model dirs and data files."""
    done = workdir / "family.json"
    if done.is_file():
        return json.loads(done.read_text())
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    log = logging.getLogger("bench")
    rng = random.Random(seed)
    english = _docstrings(4000)
    rng.shuffle(english)
    math_texts = _arithmetic(rng, 6000)
    rev_texts = [_reverse_words(t) for t in english]
    cut = int(len(english) * 0.8)
    splits = {
        "english": {"train": english[:cut], "test": english[cut:][:300]},
        "math": {"train": math_texts[:5000], "dev": math_texts[5000:5300], "test": math_texts[5300:5600]},
        # rev specialist trains on the reversed form of the base's training paragraphs; test is held out.
        "rev": {"train": rev_texts[:cut], "dev": rev_texts[cut + 300: cut + 600], "test": rev_texts[cut:][:300]},
    }
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(splits["english"]["train"] + splits["math"]["train"] + splits["rev"]["train"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", pad_token="<|pad|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    start = time.perf_counter()
    loss = _train(model, tokenizer, splits["english"]["train"] + splits["math"]["train"][:200], base_steps, 2e-3, seed)
    log.info("base: loss %.3f after %d steps (%.0fs)", loss, base_steps, time.perf_counter() - start)
    paths = {"base": str(workdir / "base")}
    model.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for index, task in enumerate(("math", "rev")):
        model.load_state_dict(base_state)
        start = time.perf_counter()
        loss = _train(model, tokenizer, splits[task]["train"], ft_steps, 1e-3, seed + 1 + index)
        log.info("%s: loss %.3f after %d steps (%.0fs)", task, loss, ft_steps, time.perf_counter() - start)
        paths[task] = str(workdir / task)
        model.save_pretrained(paths[task])
        tokenizer.save_pretrained(paths[task])
    data = {f"{task}/{split}": _write_jsonl(workdir / "data" / task / f"{split}.jsonl", texts)
            for task, by_split in splits.items() for split, texts in by_split.items()}
    family = {"models": paths, "data": data}
    done.write_text(json.dumps(family, indent=2))
    return family


# ------------------------------------------------------------------------- measurement


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", action="store_true", help="Use the pico zoo (evo-merge zoo build) instead.")
    parser.add_argument("--zoo-root", default=None, help="Zoo directory (default: EVOMERGE_ZOO / the built one).")
    parser.add_argument("--workdir", default="/tmp/evomerge_bench_sparsegpt", help="Where the synthetic family goes.")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.1])
    parser.add_argument("--base-steps", type=int, default=800)
    parser.add_argument("--ft-steps", type=int, default=300)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="Write all figures here as JSON.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("evomerge_opt", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from evomerge_opt.fitness.compare import MergeComparison

    if args.zoo:
        from evomerge_opt.io.sources import resolve_model_ref

        if args.zoo_root:
            os.environ["EVOMERGE_ZOO"] = args.zoo_root
        base, fts = "zoo:base", ["zoo:math", "zoo:lang"]
        tasks = {"math_en": "zoo:math", "lang": "zoo:lang"}  # task -> its specialist (same order as fts)
        calibration = [{"path": f"zoo:data/{t}/train.jsonl", "name": f"calib_{t}", "shuffle": True}
                       for t in tasks]
        evaluation = [{"path": f"zoo:data/{t}/test.jsonl", "name": t} for t in tasks]
        evaluation.append({"path": "zoo:data/math_lang/test.jsonl", "name": "math_lang"})
        resolve_model_ref(base)  # a clear error when the zoo is not built
        source = f"pico zoo at {resolve_model_ref('zoo:base').rsplit('/', 1)[0]}"
    else:
        fam = build_synthetic_family(Path(args.workdir), args.base_steps, args.ft_steps)
        base, fts = fam["models"]["base"], [fam["models"]["math"], fam["models"]["rev"]]
        calibration = [{"path": fam["data"]["math/train"], "name": "calib_math"},
                       {"path": fam["data"]["rev/train"], "name": "calib_rev"}]
        evaluation = [{"path": fam["data"]["math/test"], "name": "math"},
                      {"path": fam["data"]["rev/test"], "name": "rev"}]
        source = f"synthetic family in {args.workdir}"

    cache = Path(args.workdir) / "cache"
    names = [e["name"] for e in evaluation]
    common = {"output_dir": Path(args.workdir) / "out", "cache_dir": cache,
              "num_calibration_samples": args.calibration_samples, "calibration_seq_length": 128,
              "device": args.device, "eval_data": evaluation, "eval_num_samples": args.eval_samples,
              "eval_seq_length": 128, "save_models": False}
    rows: dict[float, dict[str, dict]] = {}
    sources = None
    for density in args.densities:
        shared = MergeComparison(base, fts, calibration, density=density, pair_calibration=False, **common)
        paired = MergeComparison(base, fts, calibration, density=density, pair_calibration=True, **common)
        wanda = MergeComparison(base, fts, calibration, density=density, pair_calibration=True, criterion="wanda",
                                **common)
        out: dict[str, dict] = {}
        res = shared.merge_all_methods(["ties_magnitude", "dare_random", "ties_sparsegpt", "dare_sparsegpt"],
                                       include_sources=sources is None)
        sources = sources or shared.last_payload.get("sources")
        out["TIES-Magnitude"], out["DARE-Random"] = res["ties_magnitude"], res["dare_random"]
        out["TIES-SparseGPT (mix)"], out["DARE-SparseGPT (mix)"] = res["ties_sparsegpt"], res["dare_sparsegpt"]
        res = paired.merge_all_methods(["ties_sparsegpt", "dare_sparsegpt"])
        out["TIES-SparseGPT (paired)"], out["DARE-SparseGPT (paired)"] = res["ties_sparsegpt"], res["dare_sparsegpt"]
        out["TIES-Wanda (paired)"] = wanda.merge_all_methods(["ties_sparsegpt"])["ties_sparsegpt"]
        out["TIES-SparseGPT+OBS (paired)"] = paired.merge_all_methods(["ties_sparsegpt_obs"])["ties_sparsegpt_obs"]
        rows[density] = out

    print(f"\nSparseGPT vs magnitude trimming on {source}; perplexity per task test set (lower is better)")
    print(f"calibration: {[c['name'] for c in calibration]}, {args.calibration_samples} rows in all; "
          "mix = every fine-tune on the mix, paired = each fine-tune on its own task's data\n")
    header = f"{'density':>8} {'method':<28}" + "".join(f"{n:>12}" for n in names) + f"{'geo-mean':>12}{'/ TIES-Mag':>12}"
    print(header)
    print("-" * len(header))

    def geo(row):
        return math.exp(sum(math.log(row["per_dataset"][n]["perplexity"]) for n in names) / len(names))

    for label, row in (sources or {}).items():
        print(f"{'-':>8} {label:<28}" + "".join(f"{row['per_dataset'][n]['perplexity']:>12.3f}" for n in names)
              + f"{geo(row):>12.3f}")
    for density, out in rows.items():
        ref = geo(out["TIES-Magnitude"])
        for label, row in out.items():
            print(f"{density:>8} {label:<28}" + "".join(f"{row['per_dataset'][n]['perplexity']:>12.3f}" for n in names)
                  + f"{geo(row):>12.3f}{geo(row) / ref:>12.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": source, "sources": sources,
                                               "results": {str(k): v for k, v in rows.items()}},
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
