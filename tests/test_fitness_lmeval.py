"""lm-evaluation-harness: `metric: choice` equals lm-eval's acc/acc_norm on the same items, lm-eval tasks
score the in-memory candidate, and `evo-merge eval --lm-eval` prints what `lm_eval --model hf` prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from evomerge_opt.cli.main import main
from evomerge_opt.fitness.evaluator import FitnessEvaluator

TASKS = Path(__file__).parent / "lm_eval_tasks"
TASK = "evomerge_tiny_choice"
DATA = TASKS / "tiny_choice.jsonl"


def _lm_eval_per_doc(model_args: str) -> dict[str, list[float]]:
    """lm-eval itself on the saved directory (what `lm_eval --model hf --model_args ...` runs)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=model_args, tasks=[TASK], batch_size=4, device="cpu",
                          bootstrap_iters=0, log_samples=True,
                          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return {m: [float(s[m]) for s in samples] for m in ("acc", "acc_norm")} | {
        f"{m}_value": out["results"][TASK][f"{m},none"] for m in ("acc", "acc_norm")}


@pytest.mark.parametrize("member", ["base", "ft0"])
def test_choice_equals_lm_eval_acc_and_acc_norm(member, tiny_llama_family, tiny_tokenizer):
    from evomerge_opt.pool import load_causal_lm

    path = tiny_llama_family[member]
    reference = _lm_eval_per_doc(f"pretrained={path},dtype=float32")
    model = load_causal_lm(str(path))
    evaluator = FitnessEvaluator.from_specs(
        [{"name": "acc", "path": str(DATA), "metric": "choice"},
         {"name": "acc_norm", "path": str(DATA), "metric": "choice", "normalize": "length"}],
        tiny_tokenizer, lm_eval=[{"task": TASK, "include_path": str(TASKS), "metric": "acc_norm", "name": "lm"}],
        batch_size=5)
    result = evaluator.evaluate(model, record_items=True)
    assert result.item_scores["acc"] == reference["acc"]
    assert result.item_scores["acc_norm"] == reference["acc_norm"]
    assert reference["acc"] != reference["acc_norm"]  # length normalisation changes some predictions
    assert result.per_dataset["acc"].value == pytest.approx(reference["acc_value"], abs=1e-12)
    # The lm-eval task on the in-memory model, in batches of 5 documents, gives lm-eval's numbers too.
    assert result.item_scores["lm"] == reference["acc_norm"]
    assert result.per_dataset["lm"].value == pytest.approx(reference["acc_norm_value"], abs=1e-12)
    assert result.per_dataset["lm"].metric == "lm_eval:acc_norm"


def test_lm_eval_task_on_a_dfs_candidate(tiny_llama_tied_bf16_family, tiny_tokenizer):
    """A DFS candidate (references to its sources' modules) scores as itself; its sources are untouched."""
    import torch

    from evomerge_opt.dfs.build import build_dfs_candidate
    from evomerge_opt.pool import load_causal_lm

    sources = [load_causal_lm(str(tiny_llama_tied_bf16_family[k]), dtype="float32") for k in ("ft0", "ft1")]
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in sources]
    recipe = {"model_paths": ["a", "b"], "num_r": 1, "layer_mask": [[[True, True], [False, True]]],
              "input_layer_model": 0, "output_layer_model": 1}
    candidate = build_dfs_candidate(sources, recipe)
    evaluator = FitnessEvaluator.from_specs(
        [{"name": "choice", "path": str(DATA), "metric": "choice"}], tiny_tokenizer,
        lm_eval=[{"task": TASK, "include_path": str(TASKS), "limit": 7}], batch_size=3)
    result = evaluator.evaluate(candidate, record_items=True)
    assert result.item_scores[TASK] == result.item_scores["choice"][:7]
    assert result.per_dataset[TASK].n == 7
    for source, state in zip(sources, before):
        assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
        assert source.lm_head.weight is source.model.embed_tokens.weight  # still tied, to its own embeddings


def _ps_recipe(fam) -> dict:
    return {"merge_method": "ties", "base_model": str(fam["base"]), "dtype": "float32",
            "models": [{"model": str(fam["ft0"]), "parameters": {"density": 0.5, "weight": 0.6}},
                       {"model": str(fam["ft1"]), "parameters": {"density": 0.5, "weight": 0.6}}]}


def _applied(tmp_path, fam) -> tuple[Path, Path]:
    from evomerge_opt.config.yamlio import save_yaml
    from evomerge_opt.merge.engine import stream_merge

    recipe_path = save_yaml(_ps_recipe(fam), tmp_path / "recipe.yml")
    out = stream_merge(_ps_recipe(fam), tmp_path / "applied")
    return recipe_path, out


def test_eval_cli_lm_eval_equals_lm_eval_on_the_applied_dir(tmp_path, tiny_llama_family, capsys):
    recipe, applied = _applied(tmp_path, tiny_llama_family)
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(recipe), "--lm-eval", TASK, "--lm-eval-include", str(TASKS), "--lm-eval-metric",
                 "acc_norm", "--device", "cpu", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    ours = json.loads(out_json.read_text())["per_dataset"][TASK]
    reference = _lm_eval_per_doc(f"pretrained={applied},dtype=float32")
    assert ours["value"] == pytest.approx(reference["acc_norm_value"], abs=1e-12)
    assert f"{reference['acc_norm_value']:.4f}" in printed and "lm_eval:acc_norm" in printed


@pytest.mark.slow
def test_eval_cli_prints_what_the_lm_eval_cli_prints(tmp_path, tiny_llama_family, capsys):
    """The real `lm_eval` console script on the applied directory (indexes all of lm-eval's tasks: ~15 s)."""
    recipe, applied = _applied(tmp_path, tiny_llama_family)
    command = [str(Path(sys.executable).with_name("lm_eval")), "run", "--model", "hf", "--model_args",
               f"pretrained={applied},dtype=float32", "--tasks", TASK, "--include_path", str(TASKS), "--device", "cpu",
               "--batch_size", "4", "--output_path", str(tmp_path / "lm_eval_out")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 7 and cells[5] in ("acc", "acc_norm"):
            rows[cells[5]] = cells[7]
    for metric in ("acc", "acc_norm"):
        assert main(["eval", str(recipe), "--lm-eval", TASK, "--lm-eval-include", str(TASKS), "--lm-eval-metric",
                     metric, "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        line = next(x for x in printed.splitlines() if x.startswith(TASK))
        assert line.split()[2] == rows[metric], (line, rows)
