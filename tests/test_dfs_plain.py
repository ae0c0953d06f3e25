"""`--format plain`: DFS paths as standard Llama/Mistral models (dfs/plain.py), and what it refuses.

Source models here are random with init std 0.05 (embedding mean square 2.5e-3): with the usual 0.02,
hidden states stay at mean square 4e-4 through the 2 tiny layers, far below a real model's residual
stream, and the eps term of RMSNorm (1e-5) is then 2.5% of it. The plain model's deviation is bounded
per norm by eps * |1 - k^-2| / mean(x^2) (dfs/plain.py), so that would test the tiny models' scale, not
the export; the bound itself is checked separately, and with eps = 0 the export is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _dfs_families import random_family as _family
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from evomerge_opt.cli.main import main
from evomerge_opt.config.yamlio import save_yaml
from evomerge_opt.dfs import plain
from evomerge_opt.dfs.stream import stream_dfs_apply
from evomerge_opt.errors import ConfigError, ShapeMismatchError

D = 32


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_tokenizer) -> dict[str, dict[str, str]]:
    from evomerge_opt.zoo.random_models import TINY_LLAMA, TINY_MISTRAL

    root = tmp_path_factory.mktemp("plain_sources")
    tied = TINY_LLAMA.model_copy(update={"tie_word_embeddings": True, "dtype": "bfloat16", "rope_theta": 50000.0})
    return {
        "llama": _family(root / "llama", TINY_LLAMA, tiny_tokenizer),
        "mistral": _family(root / "mistral", TINY_MISTRAL, tiny_tokenizer),  # sliding window 16
        "tied": _family(root / "tied", tied, tiny_tokenizer),
    }


def _path_recipe(paths: list[str], input_model: int = 1, output_model: int = 2) -> dict:
    # 7 hops; layer (0, 0) and (0, 1) are used twice (once per repetition), every scale != 1 somewhere.
    return {
        "model_paths": paths,
        "num_r": 2,
        "layer_mask": [[[True, True], [False, True], [True, False]], [[True, True], [False, False], [False, True]]],
        "scaling_factors": [[[0.8, 1.3], [None, 0.7], [1.25, None]], [[0.9, 1.1], [None, None], [None, 0.6]]],
        "bias_factors": [[[0.0, None], [None, [0.0] * D], [None, None]], [[None, None], [None, None], [None, 0.0]]],
        "input_layer_model": input_model,
        "output_layer_model": output_model,
    }


def _both(recipe: dict, tmp_path: Path, dtype: str = "float32") -> tuple[Path, Path]:
    evo = stream_dfs_apply(recipe, tmp_path / "evo", dtype=dtype)
    flat = stream_dfs_apply(recipe, tmp_path / "plain", dtype=dtype, format="plain")
    return evo, flat


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _zero_eps(model) -> None:
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.0


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_plain_equals_evo(family, families, tmp_path):
    paths = [families[family][k] for k in ("base", "ft0", "ft1")]
    recipe = _path_recipe(paths)
    evo_dir, plain_dir = _both(recipe, tmp_path)
    config = json.loads((plain_dir / "config.json").read_text())
    expected_cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[family]
    assert config["architectures"] == [expected_cls] and "auto_map" not in config
    assert config["num_hidden_layers"] == 7 and not config["tie_word_embeddings"]
    assert not (plain_dir / "modeling_evo_affine.py").exists()
    # Plain transformers, no remote code.
    flat = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    evo = AutoModelForCausalLM.from_pretrained(evo_dir, dtype=torch.float32).eval()
    assert type(flat).__name__ == expected_cls and len(flat.model.layers) == 7
    # Hops: (0,0) (0,1) (1,1) (2,0) | (0,0) (0,1) (2,1). Layer (0, 0) is written twice (hops 0 and 4), each
    # copy with its own fold a / c_t (a = c_0 = 0.8, c_4 = 0.8 * 1.3 * 0.7 * 1.25 * 0.9); the other
    # projections are plain copies.
    source = load_file(Path(paths[0]) / "model.safetensors")
    weights = load_file(plain_dir / "model.safetensors")
    c = plain.running_scales(load_recipe(recipe))
    for hop in (0, 4):
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            want = source[f"model.layers.0.{name}"] * (c[0] / c[hop])
            torch.testing.assert_close(weights[f"model.layers.{hop}.{name}"], want, rtol=1e-6, atol=0)
        assert torch.equal(weights[f"model.layers.{hop}.self_attn.q_proj.weight"], source["model.layers.0.self_attn.q_proj.weight"])
    embed = load_file(Path(paths[1]) / "model.safetensors")["model.embed_tokens.weight"]
    torch.testing.assert_close(weights["model.embed_tokens.weight"], embed * 0.8, rtol=1e-6, atol=0)

    ids = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(0))  # > Mistral's window
    with torch.no_grad():
        got, want = flat(ids).logits, evo(ids).logits
        # The eps bound (dfs/plain.py): relative max |diff| <= 1e-3 in fp32.
        assert torch.isfinite(got).all() and _relative(got, want) <= 1e-3
        # Cached generation of the plain model equals the DFS model's (greedy, past the sliding window).
        prompt = ids[:1, :12]
        plain_tokens = flat.generate(prompt, max_new_tokens=24, do_sample=False)
        evo_tokens = evo.generate(prompt, max_new_tokens=24, do_sample=False)
        assert plain_tokens.shape == (1, 36) and torch.equal(plain_tokens, evo_tokens)
        assert torch.equal(plain_tokens, flat.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False))
        # Without eps the fold is exact up to float rounding.
        _zero_eps(flat)
        _zero_eps(evo)
        assert _relative(flat(ids).logits, evo(ids).logits) <= 1e-5


def load_recipe(recipe: dict):
    from evomerge_opt.config.dfs_recipe import load_dfs_recipe

    return load_dfs_recipe(recipe)


def test_norm_bound_holds_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    for eps in (1e-5, 1e-6):
        for k in (0.3, 0.7, 1.0, 1.6, 3.0):
            for std in (0.01, 0.05, 1.0):
                x = torch.randn(64, 256, generator=gen, dtype=torch.float64) * std
                m = x.pow(2).mean(-1, keepdim=True)
                flat = x / torch.sqrt(m + eps)  # the plain model's norm of x
                dfs = (k * x) / torch.sqrt(k * k * m + eps)  # the DFS model's norm of k * x
                deviation = (flat / dfs - 1).abs().max().item()
                bound = max(plain.norm_bound(eps, k, float(v)) for v in m.flatten())
                assert deviation <= bound * (1 + 1e-9) + 1e-15
                if k == 1.0:
                    assert deviation == 0.0


def test_plain_tied_head_and_ps_source(families, tmp_path):
    tied = [families["tied"][k] for k in ("base", "ft0", "ft1")]
    # Embeddings and head from one tied model: the plain model ties them too; the first hop's factor
    # went into the embeddings and its inverse into the final norm.
    recipe = _path_recipe(tied, input_model=2, output_model=2)
    evo_dir, plain_dir = _both(recipe, tmp_path / "tied")
    config = json.loads((plain_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 50000.0 and config["rope_parameters"]["rope_theta"] == 50000.0  # 4.x reads it
    assert "lm_head.weight" not in load_file(plain_dir / "model.safetensors")
    flat = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    evo = AutoModelForCausalLM.from_pretrained(evo_dir, dtype=torch.float32).eval()
    ids = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _relative(flat(ids).logits, evo(ids).logits) <= 1e-3
    # PS+DFS: the inline PS part merged tensor by tensor, then written as plain layers.
    llama = families["llama"]
    ps = {"merge_method": "task_arithmetic", "base_model": llama["base"],
          "models": [{"model": llama["ft0"], "parameters": {"weight": 0.6}}, {"model": llama["ft1"], "parameters": {"weight": 0.4}}]}
    recipe = _path_recipe([ps, llama["ft1"], llama["ft0"]], input_model=0, output_model=0)
    evo_dir, plain_dir = _both(recipe, tmp_path / "ps")
    flat = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    evo = AutoModelForCausalLM.from_pretrained(evo_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert _relative(flat(ids).logits, evo(ids).logits) <= 1e-3


def test_plain_sequence_classification(tmp_path):
    from transformers import MistralForSequenceClassification

    from evomerge_opt.zoo.random_models import TINY_MISTRAL

    config = TINY_MISTRAL.to_hf_config()
    config.num_labels, config.pad_token_id, config.initializer_range = 3, 1, 0.05
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        MistralForSequenceClassification(config).save_pretrained(tmp_path / f"cls{seed}")
        paths.append(str(tmp_path / f"cls{seed}"))
    recipe = {"model_paths": paths, "num_r": 2, "layer_mask": [[[True, True], [False, True]], [[True, False], [False, False]]],
              "scaling_factors": [[[1.2, 0.9], [None, 1.1]], [[0.8, None], [None, None]]],
              "input_layer_model": 1, "output_layer_model": 0}
    evo_dir, plain_dir = _both(recipe, tmp_path / "out")
    assert json.loads((plain_dir / "config.json").read_text())["architectures"] == ["MistralForSequenceClassification"]
    flat = AutoModelForSequenceClassification.from_pretrained(plain_dir, dtype=torch.float32).eval()
    evo = AutoModelForSequenceClassification.from_pretrained(evo_dir, dtype=torch.float32).eval()
    assert type(flat).__name__ == "MistralForSequenceClassification" and flat.config.num_labels == 3
    ids = torch.randint(2, 128, (3, 20), generator=torch.Generator().manual_seed(2))
    ids[1, -4:] = 1  # right padding: the score is read at the last non-pad token
    with torch.no_grad():
        got, want = flat(ids).logits, evo(ids).logits
    assert got.shape == (3, 3) and _relative(got, want) <= 1e-3


# Each refusal: (slot to change, value) -> words the error must contain.
REFUSALS = [
    ("scaling_factors", (0, 1, 1), [0.9] * D, ["scaling_factors[0][1][1]", "vector"]),
    ("scaling_factors", (1, 0, 0), [[1.0 if i == j else 0.0 for j in range(D)] for i in range(D)],
     ["scaling_factors[1][0][0]", "matrix"]),
    ("bias_factors", (0, 0, 1), 0.01, ["bias_factors[0][0][1]", "non-zero bias"]),
    ("bias_factors", (0, 2, 0), [0.0] * (D - 1) + [0.5], ["bias_factors[0][2][0]", "non-zero bias"]),
    ("scaling_factors", (0, 2, 0), 0.0, ["scaling_factors[0][2][0]", "> 0"]),
    ("scaling_factors", (1, 2, 1), -1.0, ["scaling_factors[1][2][1]", "> 0"]),
]


@pytest.mark.parametrize("key,slot,value,words", REFUSALS,
                         ids=["vector-scale", "matrix-scale", "scalar-bias", "vector-bias", "zero-scale", "negative-scale"])
def test_refusals_leave_no_output(key, slot, value, words, tmp_path, capsys):
    # The sources do not even exist: the refusal comes before anything is read.
    recipe = _path_recipe([str(tmp_path / f"missing{i}") for i in range(3)])
    r, m, l = slot
    recipe[key][r][m][l] = value
    with pytest.raises(ConfigError) as info:
        stream_dfs_apply(recipe, tmp_path / "out", format="plain")
    text = str(info.value) + " ".join(getattr(info.value, "problems", []) or [])
    for word in words + ["--format evo"]:
        assert word in text, (word, text)
    assert not (tmp_path / "out").exists()
    # The CLI: exit 2 with the reason, no directory either.
    path = save_yaml(recipe, tmp_path / "recipe.yml")
    assert main(["apply", str(path), "--out", str(tmp_path / "cli_out"), "--format", "plain"]) == 2
    err = capsys.readouterr().err
    assert words[0] in err and not (tmp_path / "cli_out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left


def test_all_refusals_reported_at_once():
    recipe = load_recipe(_path_recipe(["a", "b", "c"]) | {
        "scaling_factors": [[[[0.9] * D, 1.3], [None, -0.7], [1.25, None]], [[0.9, 1.1], [None, None], [None, 0.6]]],
        "bias_factors": [[[0.1, None], [None, None], [None, None]], [[None, None], [None, None], [None, None]]]})
    problems = plain.plain_problems(recipe)
    assert len(problems) == 3 and any("[0][0][0] is a vector" in p for p in problems)
    assert plain.plain_problems(load_recipe(_path_recipe(["a", "b", "c"]))) == []  # zero biases are no bias


def test_plain_refuses_sources_with_different_layer_shapes(tmp_path, tiny_tokenizer):
    from evomerge_opt.zoo.random_models import TINY_LLAMA, random_model

    for name, size in (("a", 64), ("b", 96)):
        random_model(TINY_LLAMA.model_copy(update={"intermediate_size": size})).save_pretrained(tmp_path / name)
    recipe = {"model_paths": [str(tmp_path / "a"), str(tmp_path / "b")], "layer_mask": [[[True, False], [False, True]]]}
    with pytest.raises(ShapeMismatchError, match="intermediate_size"):
        stream_dfs_apply(recipe, tmp_path / "out", format="plain")
    assert not (tmp_path / "out").exists()
    stream_dfs_apply(recipe, tmp_path / "evo")  # the evo format keeps each source's layers


def test_model_construct_and_test_accept_both_formats(families, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [families["llama"][k] for k in ("base", "ft0", "ft1")]
    recipe = save_yaml(_path_recipe(paths), tmp_path / "route.yaml")
    for fmt, cls in (("plain", "LlamaForCausalLM"), ("evo", "EvoLlamaAffineForCausalLM")):
        out_dir = tmp_path / f"built_{fmt}"
        rc = main(["model", "--recipe", str(recipe), "--device", "cpu", "--format", fmt, "--output-dir", str(out_dir),
                   "--save-checkpoint", "construct"])
        out = capsys.readouterr().out
        assert rc == 0 and f"Class: {cls}" in out, out
        assert json.loads((out_dir / "config.json").read_text())["architectures"] == [cls]
        rc = main(["model", "--model", str(out_dir), "--device", "cpu", "test", "--sequence-length", "12"])
        out = capsys.readouterr().out
        assert rc == 0 and "OK: 1 step(s)" in out, out
    # A plain export directory is an ordinary model directory for `model`.
    flat = stream_dfs_apply(_path_recipe(paths), tmp_path / "exported", format="plain", dtype="float32")
    rc = main(["model", "--model", str(flat), "--device", "cpu", "construct"])
    assert rc == 0 and "Class: LlamaForCausalLM" in capsys.readouterr().out
    assert main(["model", "--model", str(flat), "--format", "plain", "construct"]) == 2


def test_cli_apply_format_plain(families, tmp_path, capsys):
    paths = [families["llama"][k] for k in ("base", "ft0", "ft1")]
    recipe = save_yaml(_path_recipe(paths), tmp_path / "route.yml")
    assert main(["apply", str(recipe), "--out", str(tmp_path / "flat"), "--format", "plain", "--no-progress"]) == 0
    assert "plain format" in capsys.readouterr().out
    config = json.loads((tmp_path / "flat" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    # --format belongs to DFS recipes: a PS recipe with it is refused, nothing written.
    ps = save_yaml({"merge_method": "linear", "models": [{"model": paths[0]}, {"model": paths[1]}]}, tmp_path / "ps.yml")
    assert main(["apply", str(ps), "--out", str(tmp_path / "ps_out"), "--format", "plain"]) == 2
    assert "data-flow-space" in capsys.readouterr().err and not (tmp_path / "ps_out").exists()
