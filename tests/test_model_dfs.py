"""`evo-merge model` on DFS (data-flow-space) models, and saved directories loading without evo-merge."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from evomerge_opt.cli.main import main
from evomerge_opt.config.yamlio import save_yaml

pytest.importorskip("evomerge_opt.dfs.api")

REPO = Path(__file__).resolve().parents[1]


def dfs_recipe(family: dict[str, Path]) -> dict:
    # 3 hops: ft0 layer 0, ft0 layer 1, ft1 layer 1; vector scaling on one hop, a bias on another.
    return {
        "model_paths": [str(family["ft0"]), str(family["ft1"])],
        "num_r": 1,
        "layer_mask": [[[True, True], [False, True]]],
        "scaling_factors": [[[1.0, [0.9] * 32], [1.0, 1.1]]],
        "bias_factors": [[[0.0, 0.0], [0.0, 0.01]]],
        "input_layer_model": 0,
        "output_layer_model": 1,
        "dtype": "float32",
    }


@pytest.fixture(scope="module")
def dfs_dirs(tmp_path_factory, tiny_llama_family, tiny_mistral_family) -> dict[str, Path]:
    """{'llama', 'mistral'} -> DFS output directories built with the DFS package's API."""
    from evomerge_opt.dfs.api import dfs_merge_from_config

    root = tmp_path_factory.mktemp("dfs")
    out = {}
    for name, family in (("llama", tiny_llama_family), ("mistral", tiny_mistral_family)):
        save_yaml(dfs_recipe(family), root / f"{name}.yaml")
        dfs_merge_from_config(root / f"{name}.yaml", output_path=root / name)
        out[name] = root / name
    return out


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output_models/ lands in the test's directory


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["model", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_kick_test_of_a_dfs_directory(dfs_dirs, capsys, arch):
    rc, out, _ = cli(capsys, "--model", str(dfs_dirs[arch]), "--device", "cpu", "test", "--steps", "2",
                     "--sequence-length", "24", "--batch-size", "2")
    assert rc == 0, out
    assert f"Class: Evo{arch.capitalize()}AffineForCausalLM" in out
    assert len(re.findall(r"^step \d/2  loss [\d.]+", out, flags=re.MULTILINE)) == 2 and "OK: 2 step(s)" in out


def test_construct_a_dfs_directory_on_meta(dfs_dirs, capsys):
    rc, out, _ = cli(capsys, "--model", str(dfs_dirs["llama"]), "construct")
    assert rc == 0, out
    assert "Class: EvoLlamaAffineForCausalLM  device: meta" in out
    assert "model_type='evo_llama_affine'" in out and "Tokenizer: " in out
    groups = dict(re.findall(r"^  (routing|attention|total)\s+([\d,]+)", out, flags=re.MULTILINE))
    # 3 hops: a vector scale (32) on hop 1, a scalar scale on hop 2 and a scalar bias on hop 2 (hop 0 is identity).
    assert int(groups["routing"].replace(",", "")) > 0
    # 3 distinct physical layers are stored (ft0 L0, ft0 L1, ft1 L1): 3 x (q,k,v,o) = 3 x 3072.
    assert int(groups["attention"].replace(",", "")) == 3 * (32 * 32 * 2 + 2 * 32 * 16)


def test_dfs_definition_only_from_meta(dfs_dirs, tmp_path, capsys):
    out_dir = tmp_path / "definition"
    rc, out, _ = cli(capsys, "--model", str(dfs_dirs["llama"]), "--output-dir", str(out_dir), "construct")
    assert rc == 0, out
    files = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "modeling_evo_affine.py", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".safetensors") for name in files)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["auto_map"] == json.loads((dfs_dirs["llama"] / "config.json").read_text())["auto_map"]
    assert config["hop_table"] == json.loads((dfs_dirs["llama"] / "config.json").read_text())["hop_table"]
    # The definition is enough to construct the model again (meta, then a real device without weights).
    rc, out, _ = cli(capsys, "--model", str(out_dir), "--device", "cpu", "construct")
    assert rc == 0 and "Class: EvoLlamaAffineForCausalLM  device: cpu" in out and "holds no weights" in out


def _loader_script(dirs: list[Path], out_file: Path) -> str:
    return textwrap.dedent(f"""
        import importlib.util, sys
        repo = {str(REPO)!r}
        # Drop the repository (but keep the venv's site-packages inside it) and the editable-install hooks.
        sys.path[:] = [p for p in sys.path if p not in ("", ".", repo)
                       and not (p.startswith(repo + "/") and "/.venv" not in p)]
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                            and "editable" not in repr(f)]
        sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h)]
        sys.path_importer_cache.clear()
        assert importlib.util.find_spec("evomerge_opt") is None, "evo-merge is importable"
        import torch
        torch.set_num_threads(1)
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ids = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 8, 120, 11]])
        logits = {{}}
        for index, path in enumerate({[str(d) for d in dirs]!r}):
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            tok = AutoTokenizer.from_pretrained(path)
            assert tok.eos_token == "<|endoftext|>"
            with torch.no_grad():
                logits[str(index)] = model(ids).logits.float().contiguous()
            print(index, type(model).__name__, type(model).__module__)
        print("evomerge_opt loaded:", any(m.startswith("evomerge_opt") for m in sys.modules))
        save_file(logits, {str(out_file)!r})
    """)


def test_saved_directories_load_without_evo_merge(dfs_dirs, tiny_llama_family, tmp_path, capsys):
    from evomerge_opt.modeltools import ConstructOptions, construct, make_source

    llama_cfg = tmp_path / "tiny.yaml"
    save_yaml({"architecture": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "tie_word_embeddings": True, "tokenizer": str(tiny_llama_family["base"])}, llama_cfg)
    plain, dfs = tmp_path / "plain", tmp_path / "dfs_copy"
    assert cli(capsys, "--config", str(llama_cfg), "--device", "cpu", "--save-checkpoint", "--safetensors",
               "--output-dir", str(plain), "construct")[0] == 0
    rc, out, _ = cli(capsys, "--model", str(dfs_dirs["llama"]), "--device", "cpu", "--save-checkpoint",
                     "--output-dir", str(dfs), "construct")
    assert rc == 0, out
    config = json.loads((dfs / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_evo_affine.EvoLlamaAffineForCausalLM"
    assert (dfs / "modeling_evo_affine.py").is_file() and (dfs / "model.safetensors").is_file()

    out_file = tmp_path / "logits.safetensors"
    script = tmp_path / "load.py"
    script.write_text(_loader_script([plain, dfs], out_file))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 LlamaForCausalLM transformers.models.llama" in proc.stdout
    assert re.search(r"1 EvoLlamaAffineForCausalLM transformers_modules\.", proc.stdout), proc.stdout
    assert "evomerge_opt loaded: False" in proc.stdout

    # The same logits as the models evo-merge builds in this process.
    got = st.load_file(str(out_file))
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 8, 120, 11]])
    for index, path in enumerate([plain, dfs]):
        model = construct(make_source(model=str(path)), ConstructOptions(device="cpu")).model.eval()
        with torch.no_grad():
            expected = model(ids).logits.float()
        assert torch.isfinite(got[str(index)]).all()
        torch.testing.assert_close(got[str(index)], expected, rtol=1e-5, atol=1e-5)


def test_dfs_recipe_source(dfs_dirs, tiny_llama_family, tmp_path, capsys):
    recipe = tmp_path / "route.yaml"
    save_yaml(dfs_recipe(tiny_llama_family), recipe)
    rc, out, _ = cli(capsys, "--recipe", str(recipe), "--device", "cpu", "--save-checkpoint", "construct")
    assert rc == 0, out
    out_dir = tmp_path / "output_models" / "route"
    assert (out_dir / "evomerge_recipe.yml").is_file() and (out_dir / "modeling_evo_affine.py").is_file()
    # The same weights as the directory the DFS package writes itself for this recipe.
    from evomerge_opt.modeltools.checkpoint_load import iter_checkpoint

    ours, theirs = dict(iter_checkpoint(out_dir)), dict(iter_checkpoint(dfs_dirs["llama"]))
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, theirs[name]), name
    rc, out, _ = cli(capsys, "--recipe", str(recipe), "--device", "cpu", "-r", "test", "--sequence-length", "12")
    assert rc == 0 and "OK: 1 step(s)" in out
