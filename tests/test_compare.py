"""`evo-merge compare` / MergeComparison end to end on tiny models, and `evo-merge eval`."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge_opt.cli.main import main
from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.compare import LLaMAMerger, MergeComparison

TEXTS = ["the quick brown fox jumps over the lazy dog", "what is two plus three? the answer is five.",
         "the lazy dog", "two plus three is five", "the fox is quick"]


@pytest.fixture()
def data_files(tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:3]))
    evals = tmp_path / "held_out.txt"
    evals.write_text("\n".join(TEXTS[2:]) + "\n")
    return calib, evals


def test_compare_cli_end_to_end(tmp_path, tiny_llama_family, data_files, capsys):
    calib, evals = data_files
    fam = tiny_llama_family
    out = tmp_path / "out"
    code = main(["compare", "--base", str(fam["base"]), "--finetuned", str(fam["ft0"]), str(fam["ft1"]),
                 "--calibration", str(calib), "--eval", f"qa={evals}", "--density", "0.2", "--output-dir", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--baselines"])
    assert code == 0
    printed = capsys.readouterr().out
    for label in ("TIES-Magnitude", "DARE-Random", "TIES-SparseGPT", "DARE-SparseGPT", "Perplexity", "Avg Loss"):
        assert label in printed
    payload = json.loads((out / "comparison_results.json").read_text())
    results = payload["results"]
    assert set(results) == {"ties_magnitude", "dare_random", "ties_sparsegpt", "dare_sparsegpt"}
    from transformers import AutoModelForCausalLM

    from evomerge_opt.data.windows import load_windows
    from evomerge_opt.fitness.perplexity import PerplexityEvaluator
    from evomerge_opt.pool import load_tokenizer

    tok = load_tokenizer(str(fam["base"]))
    ev = PerplexityEvaluator([("qa", load_windows({"path": str(evals)}, tok), 1.0)])
    base_sd = AutoModelForCausalLM.from_pretrained(fam["base"]).state_dict()
    saved = {}
    for key, row in results.items():
        assert row["perplexity"] > 1 and row["avg_loss"] == pytest.approx(torch.tensor(row["perplexity"]).log().item())
        model = AutoModelForCausalLM.from_pretrained(out / key)
        sd = model.state_dict()
        assert set(sd) == set(base_sd)
        assert all(torch.isfinite(t).all() for t in sd.values())
        assert (out / key / "tokenizer.json").is_file() and (out / key / "merge_recipe.yml").is_file()
        # The saved model scores what the table says.
        assert ev.evaluate(model).perplexity == pytest.approx(row["perplexity"], rel=1e-5)
        saved[key] = sd
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(saved["ties_magnitude"][q], saved["ties_sparsegpt"][q])
    assert results["ties_sparsegpt"]["hessian_seconds"] > 0
    assert set(payload["sources"]) == {"base", "finetune_0", "finetune_1"}
    assert list(results["ties_magnitude"]["per_dataset"]) == ["qa"]
    # Second run: Hessians come from the cache.
    again = MergeComparison(str(fam["base"]), [str(fam["ft0"]), str(fam["ft1"])], [str(calib)], out,
                            cache_dir=tmp_path / "cache", device="cpu", eval_data=[str(evals)], save_models=False)
    rerun = again.merge_all_methods(["ties_sparsegpt"])
    assert rerun["ties_sparsegpt"]["hessian_seconds"] < results["ties_sparsegpt"]["hessian_seconds"]
    assert rerun["ties_sparsegpt"]["perplexity"] == pytest.approx(results["ties_sparsegpt"]["perplexity"], rel=1e-6)


def test_seed_api(tmp_path, tiny_llama_family, data_files):
    calib, evals = data_files
    fam = tiny_llama_family
    merger = LLaMAMerger(base_model_path=str(fam["base"]), finetuned_model_paths=[str(fam["ft0"]), str(fam["ft1"])],
                         dataset_names=[str(calib)], output_dir=tmp_path / "m", cache_dir=tmp_path / "c",
                         density=0.5, num_calibration_samples=2, calibration_seq_length=16, device="cpu")
    tvs = merger.compute_and_save_task_vectors()
    assert len(tvs) == 2 and all(p.is_file() for p in tvs)
    hs = merger.compute_and_save_hessians()
    assert sorted(hs) == [0, 1] and all(p.is_file() for p in hs.values())
    assert merger.importance.calibration_windows(0).num_rows == 2
    ties = merger.merge_with_ties(use_sparsegpt=False)
    sgpt = merger.merge_with_ties(use_sparsegpt=True)
    dare = merger.merge_with_dare(use_sparsegpt=False)
    assert ties is not sgpt and not torch.equal(ties.lm_head.weight, dare.lm_head.weight)  # independent models
    metrics = merger.evaluate_model(sgpt, eval_dataset=str(evals), num_samples=2)
    assert metrics["perplexity"] > 1 and set(metrics["per_dataset"]) == {"held_out"}
    # One calibration dataset per fine-tune: paired automatically (each fine-tune on its own data).
    paired = MergeComparison(str(fam["base"]), [str(fam["ft0"]), str(fam["ft1"])], [str(calib), str(evals)],
                             cache_dir=tmp_path / "c", num_calibration_samples=8, device="cpu")
    assert paired.pair_calibration
    assert paired.importance.calibration_windows(1).num_rows == 3  # held_out.txt's three lines only
    assert paired.recipe("dare_sparsegpt")["parameters"]["rescale"] == "l1"
    assert paired.recipe("dare_random")["parameters"]["rescale"] == "inverse_density"
    with pytest.raises(ConfigError, match="density"):
        MergeComparison(str(fam["base"]), [str(fam["ft0"])], [str(calib)], density=0.0)
    with pytest.raises(ConfigError, match="calibration"):
        MergeComparison(str(fam["base"]), [str(fam["ft0"])], [])


def test_eval_cli_model_and_recipe(tmp_path, tiny_llama_family, data_files, capsys):
    from evomerge_opt.config.yamlio import save_yaml

    calib, evals = data_files
    fam = tiny_llama_family
    out_json = tmp_path / "r.json"
    assert main(["eval", str(fam["ft0"]), "--data", str(evals), "--data", f"c={calib}@2", "--device", "cpu",
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "held_out" in printed and "aggregate" in printed
    result = json.loads(out_json.read_text())
    assert set(result["per_dataset"]) == {"held_out", "c"}
    recipe = {"merge_method": "ties", "base_model": str(fam["base"]),
              "models": [{"model": str(fam["ft0"]), "parameters": {"density": 0.3}},
                         {"model": str(fam["ft1"]), "parameters": {"density": 0.3}}],
              "parameters": {"sparsify": "sparsegpt"}, "dtype": "float32",
              "calibration": {"datasets": [{"path": str(calib)}], "num_samples": 3, "seq_len": 32}}
    save_yaml(recipe, tmp_path / "r.yml")
    assert main(["eval", str(tmp_path / "r.yml"), "--data", str(evals), "--device", "cpu"]) == 0
    assert "held_out" in capsys.readouterr().out
    recipe.pop("calibration")
    save_yaml(recipe, tmp_path / "r2.yml")
    assert main(["eval", str(tmp_path / "r2.yml"), "--data", str(evals), "--device", "cpu"]) == 2
    assert "calibration" in capsys.readouterr().err
    assert main(["eval", str(fam["ft0"]), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ties_sparsegpt_obs(tmp_path, tiny_llama_family, data_files):
    from evomerge_opt.merge.sparsify.importance import collect_hessians, load_source_model, obs_trim

    calib, evals = data_files
    fam = tiny_llama_family
    comp = MergeComparison(str(fam["base"]), [str(fam["ft0"]), str(fam["ft1"])], [str(calib)], tmp_path / "o",
                           cache_dir=tmp_path / "c", density=0.3, device="cpu", eval_data=[str(evals)])
    results = comp.merge_all_methods(["ties_magnitude", "ties_sparsegpt_obs"])
    assert results["ties_sparsegpt_obs"]["method"] == "TIES-SparseGPT+OBS"
    assert results["ties_sparsegpt_obs"]["perplexity"] > 1
    from transformers import AutoModelForCausalLM

    obs = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "ties_sparsegpt_obs").state_dict()
    mag = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "ties_magnitude").state_dict()
    assert all(torch.isfinite(t).all() for t in obs.values()) and set(obs) == set(mag)
    assert torch.equal(obs["model.norm.weight"], mag["model.norm.weight"])
    # A Linear weight equals TIES over obs_trim'ed task vectors, recomputed here by hand.
    name = "model.layers.0.mlp.down_proj.weight"
    base = AutoModelForCausalLM.from_pretrained(fam["base"]).state_dict()[name]
    windows = comp.importance.calibration_windows(0)
    trimmed = []
    for ref in (fam["ft0"], fam["ft1"]):
        model = load_source_model(str(ref))
        h = collect_hessians(model, windows)[name]
        trimmed.append(obs_trim(model.state_dict()[name] - base, 0.3, h))
    sign = torch.where(trimmed[0] + trimmed[1] >= 0, 1.0, -1.0)
    agree = [(torch.sign(t) == sign).float() for t in trimmed]
    den = agree[0] + agree[1]
    expected = base + (trimmed[0] * agree[0] + trimmed[1] * agree[1]) / torch.where(den == 0, 1.0, den)
    assert torch.allclose(obs[name], expected, atol=1e-5)
