"""ResidentMerger: one resident model rebuilt in place, identical to the streaming apply path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge_opt.errors import ConfigError
from evomerge_opt.merge.engine import stream_merge
from evomerge_opt.merge.resident import ResidentMerger


def _recipe(family, method="ties", seed=0, weights=(0.6, 0.4), densities=(0.5, 0.3), **over):
    data = {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft0"]), "parameters": {"weight": weights[0], "density": densities[0]}},
            {"model": str(family["ft1"]), "parameters": {"weight": weights[1], "density": densities[1]}},
        ],
        "seed": seed,
    }
    data.update(over)
    return data


def _state(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(file))
    return state


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic", "linear"])
def test_build_equals_stream_merge_tensor_for_tensor(tiny_llama_family, tmp_path, method):
    recipe = _recipe(tiny_llama_family, method, seed=11)
    if method == "linear":
        for entry in recipe["models"]:
            entry["parameters"].pop("density")
    merger = ResidentMerger(recipe)
    model = merger.build(recipe)
    streamed = _state(stream_merge(recipe, tmp_path / method))
    state = model.state_dict()
    assert set(streamed) <= set(state)
    for name, tensor in streamed.items():
        assert torch.equal(state[name], tensor), name


def test_tied_bf16_build_equals_stream(tiny_llama_tied_bf16_family, tmp_path):
    recipe = _recipe(tiny_llama_tied_bf16_family, "dare_ties", seed=2)
    model = ResidentMerger(recipe).build(recipe)
    assert model.dtype == torch.bfloat16
    for name, tensor in _state(stream_merge(recipe, tmp_path / "o")).items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_builds_reuse_one_model_without_reloading(tiny_llama_family, monkeypatch):
    merger = ResidentMerger(str(tiny_llama_family["base"]), [str(tiny_llama_family["ft0"]), str(tiny_llama_family["ft1"])])
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained called during build")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    first = merger.build(_recipe(tiny_llama_family, "ties", densities=(0.2, 0.2)))
    name = "model.layers.0.mlp.down_proj.weight"
    snapshot = dict(first.named_parameters())[name].detach().clone()
    ptr = dict(first.named_parameters())[name].data_ptr()
    second = merger.build(_recipe(tiny_llama_family, "task_arithmetic", weights=(1.0, -0.5)))
    assert second is first
    after = dict(second.named_parameters())[name]
    assert after.data_ptr() == ptr  # written in place
    assert not torch.equal(after, snapshot)
    assert merger.builds == 2
    with torch.no_grad():
        assert torch.isfinite(second(torch.tensor([[1, 2, 3]])).logits).all()


def test_recipe_with_unknown_source_is_refused(tiny_llama_family, tiny_mistral_family):
    merger = ResidentMerger(str(tiny_llama_family["base"]), [str(tiny_llama_family["ft0"])])
    with pytest.raises(ConfigError, match="not resident"):
        merger.build(_recipe(tiny_llama_family))  # ft1 was not loaded
    other_base = _recipe(tiny_llama_family)
    other_base["base_model"] = str(tiny_mistral_family["base"])
    with pytest.raises(ConfigError, match="is not this merger's base"):
        merger.build(other_base)


def test_source_models_load_lazily_once(tiny_llama_family):
    merger = ResidentMerger(str(tiny_llama_family["base"]), [str(tiny_llama_family["ft0"]), str(tiny_llama_family["ft1"])])
    assert merger._source_models == {}
    first = merger.source_model(1)
    assert merger.source_model(1) is first
    models = merger.models
    assert len(models) == 2 and models[1] is first
    ft1 = _state(tiny_llama_family["ft1"])
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(dict(first.named_parameters())[name], ft1[name])
    # the task vector kept resident is x - b
    base = _state(tiny_llama_family["base"])
    torch.testing.assert_close(merger.task_vector(1, name), ft1[name] - base[name])
