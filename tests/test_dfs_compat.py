"""The DFS output directories under every transformers version users have (the compatibility matrix).

For each version a throw-away environment holds only torch (this interpreter's, shared), safetensors
and that transformers (``scripts/compat_env.py``; built once per version, cached under
``~/.cache/evomerge/compat`` or ``$EVOMERGE_COMPAT_ROOT``). A subprocess there, without evo-merge
(asserted), loads directories written here by the pinned version (``scripts/compat_check.py``) and
checks, against references computed here:

* the identity path equals model 0's logits exactly (the plain source, loaded in the same process),
  and the reference's;
* a mixed path (repeated layers, scalar/vector/matrix scales, scalar/vector biases, embeddings and head
  from different models) is finite and equals the reference, with eager attention too;
* cached generation equals uncached generation, unpadded and left-padded, and equals the pinned
  version's tokens;
* SequenceClassification heads (identity and mixed path);
* a ``--format plain`` export loads without remote code and agrees with the DFS model;
* no deprecation warning about cache keywords is raised.

Every version is marked ``compat``; CI (``make test``) runs the oldest and the newest
(``scripts/compat_env.CI_VERSIONS``), the others are also ``slow`` (``pytest -m compat`` runs all).
``EVOMERGE_SKIP_COMPAT=1`` skips them on a machine without PyPI, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dfs_families import random_family
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from evomerge_opt.dfs.stream import stream_dfs_apply

REPO = Path(__file__).resolve().parents[1]
D = 32
NEW_TOKENS = 24

_spec = importlib.util.spec_from_file_location("compat_env", REPO / "scripts" / "compat_env.py")
compat_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compat_env)


def _version_params():
    params = []
    for version in compat_env.MATRIX_VERSIONS:
        marks = [pytest.mark.compat]
        if version not in compat_env.CI_VERSIONS:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(version, marks=marks, id=f"transformers-{version}"))
    return params


def _mixed_recipe(paths: list[str], input_model: int = 1, output_model: int = 2) -> dict:
    gen = torch.Generator().manual_seed(1)
    vector = (1 + 0.1 * torch.randn(D, generator=gen)).tolist()
    matrix = (torch.eye(D) + 0.05 * torch.randn(D, D, generator=gen)).tolist()
    return {
        "model_paths": paths,
        "num_r": 2,
        "layer_mask": [[[True, True], [False, True], [False, False]], [[True, False], [False, False], [True, True]]],
        "scaling_factors": [[[0.9, vector], [None, 1.1], [None, None]], [[matrix, None], [None, None], [1.0, 0.8]]],
        "bias_factors": [[[0.01, None], [None, vector], [None, None]], [[None, None], [None, None], [None, -0.02]]],
        "input_layer_model": input_model,
        "output_layer_model": output_model,
    }


def _scalar_recipe(paths: list[str]) -> dict:
    return {
        "model_paths": paths,
        "num_r": 2,
        "layer_mask": [[[True, True], [False, True], [True, False]], [[True, True], [False, False], [False, True]]],
        "scaling_factors": [[[0.8, 1.3], [None, 0.7], [1.25, None]], [[0.9, 1.1], [None, None], [None, 0.6]]],
        "input_layer_model": 1,
        "output_layer_model": 2,
    }


def _identity(paths: list[str]) -> dict:
    return {"model_paths": paths, "layer_mask": [[[True, True]] + [[False, False]] * (len(paths) - 1)]}


def _reference(model_dir: Path, kind: str, out: Path, ids: torch.Tensor, generate: bool) -> dict:
    """Logits (and greedy tokens) of ``model_dir`` computed HERE, by the pinned transformers."""
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits.float().contiguous()
        tokens = None
        if generate:
            tokens = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=0).tolist()
    save_file({"ids": ids, "attention_mask": mask, "logits": logits}, str(out))
    return {"tokens": tokens}


@pytest.fixture(scope="module")
def matrix_jobs(tmp_path_factory, tiny_tokenizer) -> tuple[list[dict], dict]:
    """The directories every environment loads, their reference outputs, and what is expected of each."""
    if os.environ.get("EVOMERGE_SKIP_COMPAT") == "1":
        pytest.skip("EVOMERGE_SKIP_COMPAT=1: the transformers compatibility matrix was skipped on purpose")
    from transformers import LlamaForSequenceClassification, MistralForSequenceClassification

    from evomerge_opt.zoo.random_models import TINY_LLAMA, TINY_MISTRAL

    root = tmp_path_factory.mktemp("compat")
    ids = torch.randint(2, 128, (2, 20), generator=torch.Generator().manual_seed(0))  # > Mistral's window 16
    jobs, expected = [], {}

    def add(name: str, directory: Path, kind: str, remote: bool, compare_to: str | None = None,
            generate: bool = False, reference_dir: Path | None = None, attn: str | None = None) -> None:
        ref_file = root / f"{name}.ref.safetensors"
        expected[name] = _reference(reference_dir or directory, kind, ref_file, ids, generate)
        jobs.append({"name": name, "dir": str(directory), "kind": kind, "remote": remote, "reference": str(ref_file),
                     "compare_to": compare_to, "generate": generate, "new_tokens": NEW_TOKENS, "attn": attn})

    llama = TINY_LLAMA.model_copy(update={"rope_theta": 50000.0})  # not the default: 4.x must read it
    tied = TINY_LLAMA.model_copy(update={"tie_word_embeddings": True, "dtype": "bfloat16"})
    for name, spec in (("llama", llama), ("mistral", TINY_MISTRAL), ("tied", tied)):
        family = random_family(root / f"{name}_src", spec, tiny_tokenizer, legacy_rope=True)
        paths = [family[k] for k in ("base", "ft0", "ft1")]
        identity = stream_dfs_apply(_identity(paths), root / f"{name}_identity", dtype="float32")
        add(f"{name}_identity", identity, "causal", True, compare_to=family["base"], generate=True)
        if name == "tied":  # embeddings and head from one tied model: the saved model ties them
            mixed = stream_dfs_apply(_mixed_recipe(paths, 2, 2), root / "tied_mixed", dtype="float32")
            add("tied_mixed", mixed, "causal", True, generate=True)
            continue
        mixed = stream_dfs_apply(_mixed_recipe(paths), root / f"{name}_mixed", dtype="float32")
        add(f"{name}_mixed", mixed, "causal", True, generate=True)
        add(f"{name}_mixed_eager", mixed, "causal", True, generate=True, attn="eager")
        evo = stream_dfs_apply(_scalar_recipe(paths), root / f"{name}_scalar_evo", dtype="float32")
        flat = stream_dfs_apply(_scalar_recipe(paths), root / f"{name}_plain", dtype="float32", format="plain")
        # The plain export is checked against the DFS model's reference outputs.
        add(f"{name}_plain", flat, "causal", False, generate=True, reference_dir=evo)

    for name, cls, spec in (("llama", LlamaForSequenceClassification, llama),
                            ("mistral", MistralForSequenceClassification, TINY_MISTRAL)):
        config = spec.to_hf_config()
        config.num_labels, config.pad_token_id, config.initializer_range = 3, 1, 0.05
        paths = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            directory = root / f"{name}_cls{seed}"
            cls(config).save_pretrained(directory)
            data = json.loads((directory / "config.json").read_text())
            data["rope_theta"] = data["rope_parameters"]["rope_theta"]
            (directory / "config.json").write_text(json.dumps(data))
            paths.append(str(directory))
        identity = stream_dfs_apply(_identity(paths), root / f"{name}_seqcls_identity", dtype="float32")
        add(f"{name}_seqcls_identity", identity, "seqcls", True, compare_to=paths[0])
        recipe = {"model_paths": paths, "num_r": 2, "layer_mask": [[[True, True], [False, True]], [[True, False], [False, True]]],
                  "scaling_factors": [[[1.2, [0.9] * D], [None, 1.1]], [[0.8, None], [None, None]]],
                  "bias_factors": [[[None, 0.01], [None, None]], [[None, None], [None, [0.02] * D]]],
                  "input_layer_model": 1, "output_layer_model": 0}
        mixed = stream_dfs_apply(recipe, root / f"{name}_seqcls_mixed", dtype="float32")
        add(f"{name}_seqcls_mixed", mixed, "seqcls", True)
    (root / "jobs.json").write_text(json.dumps({"jobs": jobs}))
    return jobs, {"expected": expected, "root": root}


def _run_check(python: Path, jobs_file: Path, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(work / "hf_modules"), "TRANSFORMERS_VERBOSITY": "error"})
    result = subprocess.run([str(python), str(REPO / "scripts" / "compat_check.py"), str(jobs_file)], cwd=work,
                            env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT=")]
    assert lines, (result.stdout[-2000:], result.stderr[-2000:])
    return json.loads(lines[-1].split("=", 1)[1])


@pytest.mark.parametrize("version", _version_params())
def test_dfs_directories_under_transformers(version, matrix_jobs, tmp_path):
    jobs, info = matrix_jobs
    python = compat_env.ensure_env(version, log=lambda msg: print(msg, file=sys.stderr))
    report = _run_check(python, info["root"] / "jobs.json", tmp_path)
    assert report["transformers"] == version
    problems = []
    for job in jobs:
        name, entry, want = job["name"], report["jobs"][job["name"]], info["expected"][job["name"]]
        if "error" in entry:
            problems.append(f"{name}: {entry['error']}")
            continue
        if job["remote"] and not entry["module"].startswith("transformers_modules"):
            problems.append(f"{name}: loaded {entry['module']}, not the directory's modeling file")
        if not entry["finite"]:
            problems.append(f"{name}: non-finite logits")
        # Identical to the pinned version's outputs (plain: the DFS model's, to the eps bound of dfs/plain.py).
        tolerance = 1e-3 * entry["reference_scale"] if name.endswith("_plain") else 1e-5 * max(1.0, entry["reference_scale"])
        if entry["max_abs_diff_vs_reference"] > tolerance:
            problems.append(f"{name}: max |logits - reference| = {entry['max_abs_diff_vs_reference']:.3g} > {tolerance:.3g}")
        if job["compare_to"] and not entry["equal_to_compare"]:
            problems.append(f"{name}: identity path differs from model 0 by {entry['max_abs_diff_vs_compare']:.3g}")
        if job["generate"]:
            if not entry["generate_equal"]:
                problems.append(f"{name}: cached generation differs from uncached generation")
            if not entry["generate_padded_equal"]:
                problems.append(f"{name}: left-padded cached generation differs from uncached generation")
            if entry["generated"] != want["tokens"]:
                problems.append(f"{name}: generated {entry['generated']} but the pinned version generated {want['tokens']}")
        cache_warnings = [w for w in entry["warnings"] if "past_key_values" in w or "cache_position" in w]
        if cache_warnings:
            problems.append(f"{name}: deprecation warnings {cache_warnings}")
    assert not problems, "\n".join(problems)


@pytest.mark.compat
@pytest.mark.slow
def test_plain_export_converts_to_gguf_like_any_llama(matrix_jobs, tmp_path):
    """llama.cpp's own HF -> GGUF converter (from llama-cpp-python's source distribution, nothing compiled)
    takes a ``--format plain`` export as it takes a standard Llama, and writes exactly its tensors."""
    jobs, _ = matrix_jobs
    dirs = {job["name"]: job["dir"] for job in jobs}
    checks = []
    for name in ("llama", "mistral"):
        checks.append({"name": f"{name}_plain", "dir": dirs[f"{name}_plain"]})
        source = json.loads((Path(dirs[f"{name}_identity"]) / "config.json").read_text())["source_model_names"][0]
        checks.append({"name": f"{name}_source", "dir": source})
    spec = tmp_path / "gguf_jobs.json"
    spec.write_text(json.dumps({"work": str(tmp_path / "work"), "jobs": checks}))
    python, llama_cpp = compat_env.ensure_gguf_converter(log=lambda msg: print(msg, file=sys.stderr))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(python), str(REPO / "scripts" / "gguf_check.py"), str(llama_cpp), str(spec)],
                            cwd=tmp_path, env=env | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("REPORT=")][-1].split("=", 1)[1])
    for name in ("llama", "mistral"):
        plain_entry, source_entry = report[f"{name}_plain"], report[f"{name}_source"]
        assert "error" not in plain_entry and "error" not in source_entry, (plain_entry, source_entry)
        config = json.loads((Path(dirs[f"{name}_plain"]) / "config.json").read_text())
        assert plain_entry["architecture"] == source_entry["architecture"] == "llama"
        assert plain_entry["block_count"] == config["num_hidden_layers"] == 7 and source_entry["block_count"] == 2
        assert plain_entry["rope_freq_base"] == source_entry["rope_freq_base"] == config["rope_parameters"]["rope_theta"]
        for entry in (plain_entry, source_entry):
            assert entry["tensors"] == entry["checkpoint_tensors"] and not entry["missing"] and not entry["mismatched"]
