"""What Optuna's public per-call storage API costs per trial, against a trial at SmolLM2-360M shape.

evo-merge used to write a trial's genome parameters in ONE SQLite transaction and its user
attributes + intermediate values in another, through Optuna internals (``optuna.storages._rdb.models``,
``_create_scoped_session``, ``_set_trial_attr_without_commit``). It now uses the public API
(``trial.suggest_float`` per coordinate, ``trial.set_user_attr`` per attribute, ``trial.report`` per
batch: one transaction each). This script measures both in the same run, interleaved trial by trial
on two SQLite studies (WAL, as ``evo-merge search`` opens them; heartbeats off so only the writes
differ), and then times what a trial does besides: building a TIES candidate of two SmolLM2-360M-shaped
random bf16 fine-tunes in memory (``ResidentMerger``) and scoring it on ``--eval-tokens`` tokens.

Figures: median per-trial seconds of the storage writes for each way and genome size (``--coords``),
the difference, and that difference as a share of the measured trial time.

Usage::

    .venv/bin/python benchmarks/optuna_overhead.py                    # 130 and 260 coordinates, 20 trials each
    .venv/bin/python benchmarks/optuna_overhead.py --skip-model       # storage only
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_ATTRS = 10  # genome, recipe, worker, per_dataset, perplexity, tokens, build/eval seconds, ...
N_STEPS = 16  # intermediate values (one per evaluation batch)


def _attrs(names: list[str], values: dict[str, float]) -> dict:
    recipe = {"merge_method": "ties", "base_model": "base", "models": [
        {"model": f"ft{i}", "parameters": {"weight": [values[n] for n in names[: len(names) // 2]],
                                            "density": [values[n] for n in names[len(names) // 2 :]]}}
        for i in range(2)]}
    attrs = {"genome": [values[n] for n in names], "recipe": recipe, "worker": "host:1",
             "per_dataset": {"data": 12.5}, "perplexity": 12.5, "tokens": 4096, "build_seconds": 1.0,
             "eval_seconds": 2.0}
    attrs.update({f"extra{i}": i for i in range(N_ATTRS - len(attrs))})
    return attrs


def public_objective(names: list[str], timings: list[float]):
    def objective(trial):
        t0 = time.perf_counter()
        values = {n: trial.suggest_float(n, 0.0, 1.0) for n in names}
        for key, value in _attrs(names, values).items():
            trial.set_user_attr(key, value)
        for step in range(N_STEPS):
            trial.report(10.0 + step, step)
        timings.append(time.perf_counter() - t0)
        return 1.0

    return objective


def batched_objective(names: list[str], timings: list[float]):
    """The removed way (Optuna internals; kept here only to measure what it saved)."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    unit = FloatDistribution(0.0, 1.0)
    dist_json = optuna.distributions.distribution_to_json(unit)

    def objective(trial):
        t0 = time.perf_counter()
        backend = trial.storage._backend
        frozen = trial._cached_frozen_trial
        relative = trial.relative_params or {}
        pending = {n: float(relative[n]) if n in relative else float(trial.study.sampler.sample_independent(
            trial.study, trial._get_latest_trial(), n, unit)) for n in names}
        with _create_scoped_session(backend.scoped_session, True) as session:
            session.add_all([models.TrialParamModel(trial_id=trial._trial_id, param_name=n,
                                                    param_value=unit.to_internal_repr(v), distribution_json=dist_json)
                             for n, v in pending.items()])
        frozen.params.update(pending)
        frozen.distributions.update({n: unit for n in pending})
        values = {n: trial.suggest_float(n, 0.0, 1.0) for n in names}
        with _create_scoped_session(backend.scoped_session, True) as session:
            for key, value in _attrs(names, values).items():
                backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial._trial_id,
                                                       key, value)
            for step in range(N_STEPS):
                backend._set_trial_intermediate_value_without_commit(session, trial._trial_id, step, 10.0 + step)
        timings.append(time.perf_counter() - t0)
        return 1.0

    return objective


def measure_storage(coords: int, trials: int, workdir: Path) -> dict[str, float]:
    import optuna

    from evomerge_opt.search.storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [f"c{i}" for i in range(coords)]
    studies, timings = {}, {}
    for way in ("public", "batched"):
        storage = make_storage(f"sqlite:///{workdir / f'{way}_{coords}.db'}", heartbeat_interval=None)
        studies[way] = optuna.create_study(study_name=way, storage=storage,
                                           sampler=optuna.samplers.RandomSampler(seed=0))
        timings[way] = []
    objectives = {"public": public_objective(names, timings["public"]),
                  "batched": batched_objective(names, timings["batched"])}
    for _ in range(trials):  # interleaved: both ways see the same machine load
        for way in ("public", "batched"):
            studies[way].optimize(objectives[way], n_trials=1)
    return {way: statistics.median(t) for way, t in timings.items()}


def measure_trial(workdir: Path, eval_tokens: int, threads: int, device: str) -> dict[str, float]:
    import torch

    from evomerge_opt.config.model_config import ModelConfigSpec
    from evomerge_opt.data.windows import TokenWindows
    from evomerge_opt.fitness.perplexity import PerplexityEvaluator
    from evomerge_opt.merge.resident import ResidentMerger
    from evomerge_opt.zoo.random_models import save_random_family

    torch.set_num_threads(threads)
    # SmolLM2-360M's shape: 32 layers, hidden 960, 15 heads, 5 KV heads, intermediate 2560, vocab 49152, tied.
    spec = ModelConfigSpec(architecture="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
                           num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                           max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
                           dtype="bfloat16")
    family = save_random_family(spec, workdir / "smollm2_360m", n_finetunes=2)
    merger = ResidentMerger(str(family["base"]), [str(family["ft0"]), str(family["ft1"])], dtype="bfloat16",
                            device=device)
    recipe = {"merge_method": "ties", "base_model": str(family["base"]), "dtype": "bfloat16",
              "models": [{"model": str(family[f"ft{i}"]), "parameters": {"weight": 0.5, "density": 0.5}}
                         for i in range(2)]}
    seq = 256
    rows = max(1, eval_tokens // seq)
    ids = torch.randint(0, spec.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))
    windows = TokenWindows(ids, torch.ones_like(ids, dtype=torch.bool), "random")
    evaluator = PerplexityEvaluator([("random", windows, 1.0)], batch_size=4, device=device)
    builds, evals = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        model = merger.build(recipe)
        _sync(device)
        t1 = time.perf_counter()
        evaluator.evaluate(model)
        _sync(device)
        builds.append(t1 - t0)
        evals.append(time.perf_counter() - t1)
    return {"build_s": min(builds), "eval_s": min(evals), "params": sum(p.numel() for p in model.parameters())}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coords", default="130,260", help="Genome sizes (comma-separated).")
    parser.add_argument("--trials", type=int, default=20, help="Trials per way and genome size.")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="Tokens scored per trial.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the model part.")
    parser.add_argument("--device", default="cpu", help="Device of the model part (cpu, cuda).")
    parser.add_argument("--skip-model", action="store_true", help="Storage figures only.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="evomerge_optuna_") as tmp:
        workdir = Path(tmp)
        storage = {int(c): measure_storage(int(c), args.trials, workdir) for c in args.coords.split(",")}
        trial = None if args.skip_model else measure_trial(workdir, args.eval_tokens, args.threads, args.device)
    trial_s = None if trial is None else trial["build_s"] + trial["eval_s"]
    if trial is not None:
        print(f"trial at SmolLM2-360M shape ({trial['params'] / 1e6:.0f}M params, 2 sources, TIES, bf16, {args.device}, "
              f"{args.threads} threads): build {trial['build_s']:.2f} s + eval of {args.eval_tokens} tokens "
              f"{trial['eval_s']:.2f} s = {trial_s:.2f} s")
    print(f"{'coords':>6} {'public s/trial':>15} {'batched s/trial':>16} {'extra':>9} {'extra / trial':>14}")
    for coords, t in storage.items():
        extra = t["public"] - t["batched"]
        share = f"{100 * extra / trial_s:.1f}%" if trial_s else "-"
        print(f"{coords:>6} {t['public']:>15.4f} {t['batched']:>16.4f} {extra:>9.4f} {share:>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
