"""Portable DFS output directories: saved files, bf16 default, loading without evo-merge, seed-003 API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from evomerge_opt.config.yamlio import save_yaml
from evomerge_opt.dfs.api import dfs_merge_from_config
from evomerge_opt.dfs.build import build_dfs_candidate
from evomerge_opt.dfs.save import MODELING_FILE, RECIPE_FILE, save_dfs_model
from evomerge_opt.dfs.stream import apply_dfs_recipe

REPO = Path(__file__).resolve().parents[1]
D = 32

# Runs in a fresh interpreter from which evomerge_opt is NOT importable (repo path, editable-install
# path hook and finder removed; asserted), loads each directory with plain transformers +
# trust_remote_code and checks its outputs against the saved reference (and generate with/without cache).
_ISOLATED = textwrap.dedent(
    """
    import importlib.util, json, sys
    REPO = {repo!r}
    sys.path[:] = [p for p in sys.path if p not in ("", ".", REPO) and "__editable__" not in p
                   and not (p.startswith(REPO + "/") and "/.venv/" not in p)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("evomerge_opt") is None, "evomerge_opt is still importable"
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    report = {{}}
    for directory, kind in {jobs!r}:
        ref = torch.load(directory + "/../ref.pt", weights_only=True)
        auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
        model = auto.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(ref["ids"]).logits
        entry = {{"class": type(model).__name__, "module": type(model).__module__,
                 "max_abs_diff": (logits - ref["logits"]).abs().max().item(), "equal": torch.equal(logits, ref["logits"])}}
        if kind == "causal":
            with torch.no_grad():
                a = model.generate(ref["ids"][:1], max_new_tokens=20, do_sample=False)
                b = model.generate(ref["ids"][:1], max_new_tokens=20, do_sample=False, use_cache=False)
            entry["generate_equal"] = torch.equal(a, b)
            entry["tokenizer"] = type(AutoTokenizer.from_pretrained(directory)).__name__
        report[directory] = entry
    assert "evomerge_opt" not in sys.modules
    print("REPORT=" + json.dumps(report))
    """
)


def _run_isolated(jobs: list[tuple[str, str]], cwd: Path) -> dict:
    script = _ISOLATED.format(repo=str(REPO), jobs=jobs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(cwd / "hf_modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "REPORT=" in line]
    assert lines, (result.stdout[-2000:], result.stderr[-2000:])
    return json.loads(lines[-1].split("REPORT=", 1)[1])


def _load(family: dict) -> list:
    return [AutoModelForCausalLM.from_pretrained(family[k], dtype=torch.float32).eval() for k in ("base", "ft0", "ft1")]


def _recipe(paths=("a", "b", "c")) -> dict:
    gen = torch.Generator().manual_seed(1)
    vector = (1 + 0.1 * torch.randn(D, generator=gen)).tolist()
    matrix = (torch.eye(D) + 0.05 * torch.randn(D, D, generator=gen)).tolist()
    return {
        "model_paths": [[str(p), None] for p in paths],
        "num_r": 2,
        "layer_mask": [[[True, True], [False, True], [False, False]], [[True, False], [False, False], [True, True]]],
        "scaling_factors": [[[0.9, vector], [None, 1.1], [None, None]], [[matrix, None], [None, None], [1.0, 0.8]]],
        "bias_factors": [[[0.01, None], [None, vector], [None, None]], [[None, None], [None, None], [None, -0.02]]],
        "input_layer_model": 1,
        "output_layer_model": 2,
    }


def _save_reference(candidate, ids, out: Path) -> None:
    with torch.no_grad():
        logits = candidate(ids).logits
    torch.save({"ids": ids, "logits": logits}, out / "ref.pt")


def test_saved_dirs_load_without_the_package(tmp_path, tiny_llama_family, tiny_mistral_family, tiny_tokenizer):
    ids = torch.randint(2, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    jobs = []
    for name, family in (("llama", tiny_llama_family), ("mistral", tiny_mistral_family)):
        models = _load(family)
        candidate = build_dfs_candidate(models, _recipe())
        work = tmp_path / name
        work.mkdir()
        out = save_dfs_model(candidate, tiny_tokenizer, work / "fp32", dtype="float32", recipe=_recipe())
        _save_reference(candidate, ids, work)
        jobs.append((str(out), "causal"))
    # Sequence classification (Mistral, sliding window), built from tiny random classifiers.
    from transformers import MistralForSequenceClassification

    from evomerge_opt.zoo.random_models import TINY_MISTRAL

    config = TINY_MISTRAL.to_hf_config()
    config.num_labels, config.pad_token_id = 3, 1
    classifiers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        classifiers.append(MistralForSequenceClassification(config).eval())
    recipe = {"model_paths": ["a", "b"], "layer_mask": [[[True, True], [True, False]]],
              "scaling_factors": [[[1.1, None], [0.9, None]]], "input_layer_model": 0, "output_layer_model": 1}
    candidate = build_dfs_candidate(classifiers, recipe)
    work = tmp_path / "seqcls"
    work.mkdir()
    out = save_dfs_model(candidate, None, work / "fp32", dtype=torch.float32)
    _save_reference(candidate, ids, work)
    jobs.append((str(out), "seqcls"))

    report = _run_isolated(jobs, tmp_path)
    for directory, entry in report.items():
        assert entry["module"].startswith("transformers_modules"), entry  # the copied modeling file
        assert entry["equal"], (directory, entry)
    classes = [report[d]["class"] for d, _ in jobs]
    assert classes == ["EvoLlamaAffineForCausalLM", "EvoMistralAffineForCausalLM",
                       "EvoMistralAffineForSequenceClassification"]
    assert all(report[d]["generate_equal"] for d, kind in jobs if kind == "causal")
    assert report[jobs[0][0]]["tokenizer"] == "TokenizersBackend" or report[jobs[0][0]]["tokenizer"].endswith("Fast")


def test_directory_contents_and_bf16_default(tmp_path, tiny_llama_family, tiny_tokenizer):
    models = _load(tiny_llama_family)
    candidate = build_dfs_candidate(models, _recipe())
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    out = save_dfs_model(candidate, tiny_tokenizer, tmp_path / "out", recipe=_recipe())
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", MODELING_FILE, RECIPE_FILE, "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["EvoLlamaAffineForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_evo_affine.EvoLlamaAffineForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "modeling_evo_affine.EvoLlamaAffineConfig"
    assert config["model_type"] == "evo_llama_affine" and config["dtype"] == "bfloat16"
    assert config["hop_table"] == [[0, 0], [0, 1], [1, 1], [0, 0], [2, 0], [2, 1]]
    assert config["hop_to_physical"] == [0, 1, 2, 0, 3, 4] and config["num_hidden_layers"] == 6
    shards = sorted(out.glob("*.safetensors"))
    keys, dtypes = set(), set()
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                keys.add(key)
                dtypes.add(handle.get_tensor(key).dtype)
    assert dtypes == {torch.bfloat16}
    layer_ids = {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}
    assert layer_ids == set(range(5))  # 5 physical layers for 6 hops: the repeated one stored once
    assert "model.hops.4.scale" in keys and "model.hops.3.scale" in keys and "model.hops.1.scale" in keys
    # The sources were not cast or modified by saving.
    assert all(v.dtype == torch.float32 for v in models[0].state_dict().values())
    assert all(torch.equal(v, models[0].state_dict()[k]) for k, v in before.items())
    # bf16 model loads (in-process, registered Auto classes) and is close to the fp32 candidate.
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (loaded(ids).logits - candidate(ids).logits).abs().max().item()
    assert diff < 0.05
    with pytest.raises(FileExistsError):
        save_dfs_model(candidate, tiny_tokenizer, out)
    other = build_dfs_candidate(models, {"model_paths": ["a", "b", "c"], "layer_mask": [[[True, False], [False] * 2, [False] * 2]]})
    save_dfs_model(other, tiny_tokenizer, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["hop_table"] == [[0, 0]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dirs left behind


def test_dfs_merge_from_seed_yaml(tmp_path, tiny_llama_family):
    paths = [tiny_llama_family[k] for k in ("base", "ft0", "ft1")]
    recipe_path = save_yaml(_recipe(paths) | {"dtype": "float32"}, tmp_path / "dfs_recipe.yml")
    model, tokenizer = dfs_merge_from_config(recipe_path, output_path=tmp_path / "merged", device="cpu")
    assert type(model).__name__ == "EvoLlamaAffineForCausalLM" and tokenizer is not None
    expected = build_dfs_candidate(_load(tiny_llama_family), _recipe())
    ids = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(ids).logits
        assert torch.equal(got, expected(ids).logits)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert reloaded.dtype == torch.float32  # the recipe's dtype
        assert torch.equal(reloaded(ids).logits, got)
    out = apply_dfs_recipe(recipe_path, tmp_path / "applied", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_ps_plus_dfs_recipe(tmp_path, tiny_llama_family):
    from evomerge_opt.api import merge_recipe

    base, ft0, ft1 = (str(tiny_llama_family[k]) for k in ("base", "ft0", "ft1"))
    ps = {"merge_method": "task_arithmetic", "base_model": base,
          "models": [{"model": ft0, "parameters": {"weight": 0.7}}, {"model": ft1, "parameters": {"weight": 0.3}}],
          "dtype": "float32"}
    recipe = {"model_paths": [ps, [ft1, None]], "layer_mask": [[[True, False], [False, True]]],
              "scaling_factors": [[[1.0, None], [None, 0.9]]], "input_layer_model": 0, "output_layer_model": 0}
    model, _ = dfs_merge_from_config(recipe, device="cpu")
    ps_model = merge_recipe(ps)
    expected = build_dfs_candidate([ps_model, AutoModelForCausalLM.from_pretrained(ft1, dtype=torch.float32)], recipe)
    ids = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = model(ids).logits
        assert torch.isfinite(got).all()
        assert torch.equal(got, expected(ids).logits)
        # The PS-merged source differs from its base: the merge really happened first.
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight,
                               AutoModelForCausalLM.from_pretrained(base).model.layers[0].mlp.up_proj.weight)


def test_sequence_classification_sources_from_disk_without_tokenizer(tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    from evomerge_opt.zoo.random_models import TINY_LLAMA

    config = TINY_LLAMA.to_hf_config()
    config.num_labels, config.pad_token_id = 2, 1
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        LlamaForSequenceClassification(config).save_pretrained(tmp_path / f"cls{seed}")
        paths.append(str(tmp_path / f"cls{seed}"))
    recipe = {"model_paths": paths, "layer_mask": [[[True, False], [False, True]]], "input_layer_model": 1,
              "output_layer_model": 0, "dtype": "float32"}
    model, tokenizer = dfs_merge_from_config(recipe, output_path=tmp_path / "out")
    assert type(model).__name__ == "EvoLlamaAffineForSequenceClassification" and tokenizer is None
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSequenceClassification"].endswith("EvoLlamaAffineForSequenceClassification")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    ids = torch.randint(2, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
