"""End-to-end `evo-merge apply` on tiny random Llama/Mistral families, LoRA sources and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge_opt.cli.main import main
from evomerge_opt.config.yamlio import save_yaml
from evomerge_opt.errors import NonFiniteResultError, ShapeMismatchError
from evomerge_opt.io.checkpoint import open_checkpoint
from evomerge_opt.io.model_card import recipe_from_model_card
from evomerge_opt.merge.engine import stream_merge
from evomerge_opt.merge.methods import TensorParams, merge_tensors
from evomerge_opt.merge.sparsify import SPARSIFIERS


def _recipe(family, method="ties", **over):
    data = {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft0"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(family["ft1"]), "parameters": {"weight": 0.4, "density": [0.3, 0.9]}},
        ],
        "seed": 5,
    }
    data.update(over)
    return data


def _state(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def _load_and_run(directory: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3, 2]])).logits
    assert torch.isfinite(logits).all()
    return model


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if ".staging-" in p.name]


def test_apply_ties_llama_sharded_gqa_via_cli(tiny_llama_family, tmp_path, capsys):
    recipe_path = tmp_path / "ties.yml"
    save_yaml(_recipe(tiny_llama_family, dtype="float32"), recipe_path)
    out = tmp_path / "merged"
    assert main(["apply", str(recipe_path), "--out", str(out), "--max-shard-size", "30KB", "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "model.safetensors.index.json",
            "tokenizer.json"} <= files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # several shards
    merged, base = _state(out), _state(tiny_llama_family["base"])
    assert set(merged) == set(base)  # no missing or extra tensors
    assert all(torch.isfinite(t).all() for t in merged.values())
    # One tensor recomputed by hand from the sources: layer 1 uses density 0.9 for ft1 (gradient [0.3, 0.9]).
    name = "model.layers.1.self_attn.k_proj.weight"
    assert merged[name].shape == (16, 32)  # GQA: 2 KV heads of 8
    x0, x1 = _state(tiny_llama_family["ft0"])[name], _state(tiny_llama_family["ft1"])[name]
    p = TensorParams([0.6, 0.4], [0.5, 0.9], sparsifier=SPARSIFIERS.get("magnitude"))
    expected = merge_tensors("ties", base[name], [x0 - base[name], x1 - base[name]], p)
    torch.testing.assert_close(merged[name], expected)
    card = (out / "README.md").read_text()
    assert _yaml(recipe_from_model_card(card))["merge_method"] == "ties"
    assert _yaml((out / "evomerge_recipe.yml").read_text()) == _yaml(recipe_from_model_card(card))
    _load_and_run(out)
    _no_leftovers(tmp_path)


def _yaml(text: str):
    import yaml

    return yaml.safe_load(text)


def test_apply_dare_ties_tied_bf16(tiny_llama_tied_bf16_family, tmp_path):
    family = tiny_llama_tied_bf16_family
    assert "lm_head.weight" not in open_checkpoint(family["base"]).names()
    out = stream_merge(_recipe(family, "dare_ties"), tmp_path / "dare")
    merged = _state(out)
    assert "lm_head.weight" not in merged and merged["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = _load_and_run(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # DARE masks reproduce bit for bit from the recipe's seed.
    again = stream_merge(_recipe(family, "dare_ties"), tmp_path / "dare2")
    other = stream_merge(_recipe(family, "dare_ties", seed=6), tmp_path / "dare3")
    assert all(torch.equal(merged[k], _state(again)[k]) for k in merged)
    assert any(not torch.equal(merged[k], _state(other)[k]) for k in merged)


def test_apply_dare_linear_mistral_fp16(tiny_mistral_family, tmp_path):
    out = tmp_path / "mistral"
    recipe = tmp_path / "r.yml"
    save_yaml(_recipe(tiny_mistral_family, "dare_linear"), recipe)
    assert main(["apply", str(recipe), "--out", str(out), "--dtype", "float16", "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 16 and config["dtype"] == "float16"
    merged = _state(out)
    assert set(merged) == set(_state(tiny_mistral_family["base"]))
    assert all(t.dtype == torch.float16 for t in merged.values())
    _load_and_run(out)


def test_python_api_merge_matches_apply(tiny_llama_family, tmp_path):
    import evomerge_opt

    recipe = _recipe(tiny_llama_family, "task_arithmetic", parameters={"lambda": 0.7})
    model = evomerge_opt.merge_recipe(recipe)
    out = stream_merge(recipe, tmp_path / "ta")
    state = model.state_dict()
    for name, tensor in _state(out).items():
        assert torch.equal(state[name], tensor), name


def _make_lora(base_dir: Path, out_dir: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out_dir)
    return out_dir


def test_apply_with_lora_adapter_source(tiny_llama_family, tmp_path):
    adapter = _make_lora(tiny_llama_family["base"], tmp_path / "lora")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_llama_family["base"]),
        "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}],
    }
    out = stream_merge(recipe, tmp_path / "lora_merged")
    from evomerge_opt.pool import load_causal_lm

    expected = load_causal_lm(adapter, base_model=str(tiny_llama_family["base"]), dtype="float32").state_dict()
    merged, base = _state(out), _state(tiny_llama_family["base"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # the adapter changed q_proj
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    _load_and_run(out)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        state = load_file(file)
        save_file(edit(state), file, metadata={"format": "pt"})
    return dst


def test_nan_result_is_an_error_and_leaves_nothing(tiny_mistral_family, tmp_path):
    def poison(state):
        state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
        return state

    bad = _rewrite(tiny_mistral_family["ft0"], tmp_path / "nan_src", poison)
    recipe = _recipe(tiny_mistral_family, "task_arithmetic")
    recipe["models"][0]["model"] = str(bad)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    with pytest.raises(NonFiniteResultError, match="model.layers.0.mlp.up_proj.weight"):
        stream_merge(recipe, out_parent / "m")
    assert not (out_parent / "m").exists()
    _no_leftovers(out_parent)
    path = tmp_path / "nan.yml"
    save_yaml(recipe, path)
    assert main(["apply", str(path), "--out", str(out_parent / "m"), "--no-progress"]) == 2
    assert list(out_parent.iterdir()) == []


def _resize_vocab(state):
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensor = state[name]
        state[name] = torch.cat([tensor, torch.randn(2, tensor.shape[1])])
    return state


def test_shape_mismatch_names_tensor_and_resize_policy(tiny_mistral_family, tmp_path):
    resized = _rewrite(tiny_mistral_family["ft1"], tmp_path / "resized", _resize_vocab)
    config = json.loads((resized / "config.json").read_text())
    config["vocab_size"] = 130
    (resized / "config.json").write_text(json.dumps(config))
    recipe = _recipe(tiny_mistral_family, "ties")
    recipe["models"][1]["model"] = str(resized)
    with pytest.raises(ShapeMismatchError) as info:
        stream_merge(recipe, tmp_path / "o")
    message = str(info.value)
    assert ("'lm_head.weight'" in message or "'model.embed_tokens.weight'" in message)
    assert "[128, 32]" in message and "[130, 32]" in message
    assert "resize_policy: truncate_to_base" in message
    assert not (tmp_path / "o").exists()
    out = stream_merge({**recipe, "resize_policy": "truncate_to_base"}, tmp_path / "o")
    assert _state(out)["model.embed_tokens.weight"].shape == (128, 32)
    _load_and_run(out)


def test_different_architectures_refused(tiny_llama_family, tiny_mistral_family, tmp_path):
    recipe = _recipe(tiny_llama_family)
    recipe["models"][1]["model"] = str(tiny_mistral_family["ft1"])
    with pytest.raises(ShapeMismatchError, match="model_type: base 'llama' vs 'mistral'"):
        stream_merge(recipe, tmp_path / "o")


def test_cli_bad_inputs_exit_non_zero(tiny_llama_family, tmp_path, capsys):
    cases = {
        "missing": _recipe(tiny_llama_family, base_model=str(tmp_path / "no_such_model")),
        "density": {**_recipe(tiny_llama_family)},
        "method": _recipe(tiny_llama_family, "frankenmerge"),
    }
    cases["density"]["models"][0]["parameters"]["density"] = 0.0
    messages = {}
    for key, recipe in cases.items():
        path = tmp_path / f"{key}.yml"
        save_yaml(recipe, path)
        assert main(["apply", str(path), "--out", str(tmp_path / f"out_{key}"), "--no-progress"]) == 2
        messages[key] = capsys.readouterr().err
        assert not (tmp_path / f"out_{key}").exists()
    assert "does not exist" in messages["missing"]
    assert "`0 < density <= 1` must hold" in messages["density"]
    assert "valid merge methods are: dare_linear, dare_ties, linear, task_arithmetic, ties" in messages["method"]
    assert main(["apply", str(tmp_path / "absent.yml"), "--out", str(tmp_path / "x")]) == 2
    # An existing output is refused without --overwrite and replaced with it.
    good = tmp_path / "good.yml"
    save_yaml(_recipe(tiny_llama_family), good)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("x")
    assert main(["apply", str(good), "--out", str(tmp_path / "exists"), "--no-progress"]) == 2
    assert (tmp_path / "exists" / "keep.txt").exists()
    assert main(["apply", str(good), "--out", str(tmp_path / "exists"), "--overwrite", "--no-progress"]) == 0
    assert not (tmp_path / "exists" / "keep.txt").exists()


def test_source_without_weights(tiny_llama_family, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    shutil.copy(tiny_llama_family["base"] / "config.json", empty / "config.json")
    recipe = _recipe(tiny_llama_family)
    recipe["models"][0]["model"] = str(empty)
    from evomerge_opt.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match="no \\*.safetensors"):
        stream_merge(recipe, tmp_path / "o")


def test_linear_without_base_and_base_listed_as_model(tiny_llama_family, tmp_path):
    fam = tiny_llama_family
    recipe = {"merge_method": "linear", "models": [
        {"model": str(fam["base"]), "parameters": {"weight": 1.0}},
        {"model": str(fam["ft0"]), "parameters": {"weight": 3.0}}]}
    out = stream_merge(recipe, tmp_path / "lin")
    base, ft0 = _state(fam["base"]), _state(fam["ft0"])
    for name, tensor in _state(out).items():
        torch.testing.assert_close(tensor, (base[name] + 3 * ft0[name]) / 4)
    # For task-vector methods the base listed among the models adds nothing (mergekit's behaviour).
    ties = _recipe(fam)
    ties["models"].append({"model": str(fam["base"]), "parameters": {"weight": 0.5}})
    with_base = _state(stream_merge(ties, tmp_path / "t1"))
    without = _state(stream_merge(_recipe(fam), tmp_path / "t2"))
    assert all(torch.equal(with_base[k], without[k]) for k in without)


def test_fp16_sources_tokenizer_source_and_progress(tiny_mistral_family, tmp_path):
    def to_half(state):
        return {k: v.half() for k, v in state.items()}

    fam = {k: _rewrite(v, tmp_path / f"half_{k}", to_half) for k, v in tiny_mistral_family.items()}
    for path in fam.values():
        config = json.loads((path / "config.json").read_text())
        config["dtype"] = "float16"
        (path / "config.json").write_text(json.dumps(config))
    (fam["base"] / "tokenizer.json").unlink()  # the tokenizer must come from tokenizer_source
    recipe = _recipe(fam, "ties", tokenizer_source=str(fam["ft1"]))
    out = stream_merge(recipe, tmp_path / "half_out", progress=True)
    merged = _state(out)
    assert all(t.dtype == torch.float16 for t in merged.values())
    assert (out / "tokenizer.json").read_bytes() == (fam["ft1"] / "tokenizer.json").read_bytes()
    base, x0, x1 = (_state(fam[k]) for k in ("base", "ft0", "ft1"))
    name = "model.layers.0.mlp.gate_proj.weight"
    p = TensorParams([0.6, 0.4], [0.5, 0.3], sparsifier=SPARSIFIERS.get("magnitude"))
    b32 = base[name].float()
    expected = merge_tensors("ties", b32, [x0[name].float() - b32, x1[name].float() - b32], p).half()
    assert torch.equal(merged[name], expected)
    _load_and_run(out)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_cuda_apply_matches_cpu(tiny_llama_tied_bf16_family, tmp_path, method):
    recipe = _recipe(tiny_llama_tied_bf16_family, method, dtype="float32")
    cpu = _state(stream_merge(recipe, tmp_path / "cpu"))
    gpu = _state(stream_merge(recipe, tmp_path / "gpu", device="cuda"))
    for name, tensor in cpu.items():
        torch.testing.assert_close(gpu[name], tensor, rtol=1e-6, atol=1e-7)
