"""Streaming DFS / PS+DFS apply (dfs/stream.py) writes exactly what the in-memory path wrote, model-free."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge_opt.dfs.api import dfs_merge_from_config
from evomerge_opt.dfs.stream import apply_dfs_recipe, stream_dfs_apply

D = 32


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_same_dirs(streamed: Path, reference: Path) -> None:
    """Tensor for tensor (names, dtypes, values) and file for file (config, generation config, tokenizer,
    recipe, card, modeling file): the streamed directory is today's output."""
    got, want = _tensors(streamed), _tensors(reference)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    files = {p.name for p in reference.iterdir() if not p.name.endswith((".safetensors", ".index.json"))}
    assert files == {p.name for p in streamed.iterdir() if not p.name.endswith((".safetensors", ".index.json"))}
    for name in sorted(files):
        if name.endswith(".json"):
            assert json.loads((streamed / name).read_text()) == json.loads((reference / name).read_text()), name
        else:
            assert (streamed / name).read_bytes() == (reference / name).read_bytes(), name


def _factors(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    vector = (1 + 0.1 * torch.randn(D, generator=gen)).tolist()
    matrix = (torch.eye(D) + 0.05 * torch.randn(D, D, generator=gen)).tolist()
    return vector, matrix


def _mixed_recipe(paths: list, input_model: int = 1, output_model: int = 2) -> dict:
    vector, matrix = _factors()
    return {
        "model_paths": paths,
        "num_r": 2,
        "layer_mask": [[[True, True], [False, True], [False, False]], [[True, False], [False, False], [True, True]]],
        "scaling_factors": [[[0.9, vector], [None, 1.1], [None, None]], [[matrix, None], [None, None], [1.0, 0.8]]],
        "bias_factors": [[[0.01, None], [None, vector], [None, None]], [[None, None], [None, None], [None, -0.02]]],
        "input_layer_model": input_model,
        "output_layer_model": output_model,
    }


def _both(recipe: dict, tmp_path: Path, **kwargs) -> tuple[Path, Path]:
    reference = tmp_path / "in_memory"
    dfs_merge_from_config(recipe, output_path=reference, save_dtype=kwargs.get("dtype"))
    streamed = stream_dfs_apply(recipe, tmp_path / "streamed", **kwargs)
    return streamed, reference


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_streamed_dfs_equals_in_memory_llama(tmp_path, tiny_llama_family, dtype):
    paths = [str(tiny_llama_family[k]) for k in ("base", "ft0", "ft1")]
    streamed, reference = _both(_mixed_recipe(paths), tmp_path, dtype=dtype)
    _assert_same_dirs(streamed, reference)
    config = json.loads((streamed / "config.json").read_text())
    assert config["hop_to_physical"] == [0, 1, 2, 0, 3, 4]
    assert {int(k.split(".")[2]) for k in _tensors(streamed) if k.startswith("model.layers.")} == set(range(5))
    assert (dtype or "bfloat16") == config["dtype"]


def test_streamed_dfs_equals_in_memory_mistral_and_tied(tmp_path, tiny_mistral_family, tiny_llama_tied_bf16_family):
    paths = [str(tiny_mistral_family[k]) for k in ("base", "ft0", "ft1")]
    streamed, reference = _both(_mixed_recipe(paths, 0, 0), tmp_path / "mistral", dtype="float32")
    _assert_same_dirs(streamed, reference)
    # Tied bf16 sources, embeddings and head from the same model: the head is tied, no lm_head stored.
    tied = [str(tiny_llama_tied_bf16_family[k]) for k in ("base", "ft0", "ft1")]
    streamed, reference = _both(_mixed_recipe(tied, 2, 2), tmp_path / "tied")
    _assert_same_dirs(streamed, reference)
    assert "lm_head.weight" not in _tensors(streamed)
    # ... and from different models: the head is the output model's embedding, written untied.
    streamed, reference = _both(_mixed_recipe(tied, 0, 1), tmp_path / "untied")
    _assert_same_dirs(streamed, reference)
    heads = _tensors(streamed)
    assert not torch.equal(heads["lm_head.weight"], heads["model.embed_tokens.weight"])


def test_streamed_ps_plus_dfs_equals_in_memory(tmp_path, tiny_llama_family, tiny_llama_tied_bf16_family):
    base, ft0, ft1 = (str(tiny_llama_family[k]) for k in ("base", "ft0", "ft1"))
    ps = {"merge_method": "ties", "base_model": base, "parameters": {"normalize": True},
          "models": [{"model": ft0, "parameters": {"weight": 0.7, "density": 0.5}},
                     {"model": ft1, "parameters": {"weight": 0.3, "density": 0.6}}]}
    recipe = _mixed_recipe([ps, ft1, ft0], input_model=0, output_model=0)
    streamed, reference = _both(recipe, tmp_path / "ps_dfs", dtype="float32")
    _assert_same_dirs(streamed, reference)
    # The PS part really was merged (its layer 0 is neither the base's nor a source's).
    merged = _tensors(streamed)["model.layers.0.mlp.up_proj.weight"]
    for ref in (base, ft0):
        assert not torch.equal(merged, _tensors(Path(ref))["model.layers.0.mlp.up_proj.weight"])
    # A bf16 PS part (DARE: seeded random masks) beside fp32 sources: everything is taken in float32.
    tied_base, tied_ft0 = (str(tiny_llama_tied_bf16_family[k]) for k in ("base", "ft0"))
    dare = {"merge_method": "dare_ties", "base_model": tied_base, "seed": 3,
            "models": [{"model": tied_ft0, "parameters": {"weight": 1.0, "density": 0.5}}]}
    recipe = {"model_paths": [dare, tied_ft0], "layer_mask": [[[True, False], [True, True]]],
              "scaling_factors": [[[1.2, None], [0.9, None]]], "input_layer_model": 1, "output_layer_model": 0}
    streamed, reference = _both(recipe, tmp_path / "dare")
    _assert_same_dirs(streamed, reference)


def test_streamed_sequence_classification_equals_in_memory(tmp_path):
    from transformers import LlamaForSequenceClassification

    from evomerge_opt.zoo.random_models import TINY_LLAMA

    config = TINY_LLAMA.to_hf_config()
    config.num_labels, config.pad_token_id = 3, 1
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        LlamaForSequenceClassification(config).save_pretrained(tmp_path / f"cls{seed}")
        paths.append(str(tmp_path / f"cls{seed}"))
    recipe = {"model_paths": paths, "layer_mask": [[[True, True], [False, True]]], "input_layer_model": 1,
              "output_layer_model": 0, "scaling_factors": [[[1.1, 0.95], [None, 1.05]]]}
    streamed, reference = _both(recipe, tmp_path / "out", dtype="float32")
    _assert_same_dirs(streamed, reference)
    assert "score.weight" in _tensors(streamed) and not (streamed / "generation_config.json").exists()


def test_apply_streams_without_building_a_model(tmp_path, tiny_llama_family, monkeypatch):
    """`apply_dfs_recipe` (the CLI path) never instantiates a model: building one fails here."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was instantiated")

    for cls in (transformers.PreTrainedModel,):
        monkeypatch.setattr(cls, "__init__", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    paths = [str(tiny_llama_family[k]) for k in ("base", "ft0", "ft1")]
    out = apply_dfs_recipe(_mixed_recipe(paths), tmp_path / "out", dtype="float32")
    assert (out / "modeling_evo_affine.py").is_file()
    plain = {"model_paths": paths, "layer_mask": [[[True, True], [True, False], [False, True]]],
             "scaling_factors": [[[0.9, 1.1], [1.2, None], [None, 0.7]]]}
    out = apply_dfs_recipe(plain, tmp_path / "plain", dtype="float32", format="plain")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
