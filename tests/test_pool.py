"""CausalLMPool / CausalLMBackbonePool (seed 000 API), PEFT loading and the _target_ allow-list."""

from __future__ import annotations

import pytest
import torch

from evomerge_opt.config.yamlio import save_yaml
from evomerge_opt.errors import ConfigError
from evomerge_opt.pool import (
    CausalLMBackbonePool,
    CausalLMPool,
    load_causal_lm,
    load_peft_causal_lm,
    pool_config_problems,
)


def _config(family, **over):
    data = {
        "_target_": "fusion_bench.modelpool.CausalLMPool",
        "models": {"_pretrained_": str(family["base"]), "model_a": str(family["ft0"]), "model_b": str(family["ft1"])},
        "model_kwargs": {"torch_dtype": "bfloat16"},
        "tokenizer": str(family["base"]),
    }
    data.update(over)
    return data


def _lora(base_dir, out_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    peft_model.save_pretrained(out_dir)
    return out_dir


def test_names_and_flags(tiny_llama_family, tmp_path):
    path = tmp_path / "pool.yml"
    save_yaml(_config(tiny_llama_family), path)
    pool = CausalLMPool.from_config(path)
    assert pool.model_names == ["model_a", "model_b"]
    assert pool.all_model_names == ["_pretrained_", "model_a", "model_b"]
    assert pool.has_pretrained and len(pool) == 2


def test_load_models_with_dtype_kwargs_and_overrides(tiny_llama_family):
    pool = CausalLMPool.from_config(_config(tiny_llama_family))
    model_a = pool.load_model("model_a")
    assert model_a.dtype == torch.bfloat16  # "bfloat16" string converted, torch_dtype -> dtype
    assert pool.load_model("model_a", torch_dtype="float32").dtype == torch.float32
    assert pool.load_model("model_a", dtype="float16").dtype == torch.float16
    pretrained = pool.load_pretrained_model()
    first = pool.load_pretrained_or_first_model()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(dict(pretrained.named_parameters())[name], dict(first.named_parameters())[name])
    assert not torch.equal(dict(pretrained.named_parameters())[name], dict(model_a.named_parameters())[name])
    no_pre = CausalLMPool({"m1": str(tiny_llama_family["ft1"]), "m0": str(tiny_llama_family["ft0"])})
    assert not no_pre.has_pretrained
    with pytest.raises(ConfigError, match="no '_pretrained_'"):
        no_pre.load_pretrained_model()
    ft1 = no_pre.load_pretrained_or_first_model()
    other = CausalLMPool({"x": str(tiny_llama_family["ft1"])}).load_model("x")
    assert torch.equal(dict(ft1.named_parameters())[name], dict(other.named_parameters())[name])


def test_tokenizer_and_save_model(tiny_llama_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pool = CausalLMPool.from_config(_config(tiny_llama_family))
    tokenizer = pool.load_tokenizer()
    assert tokenizer("the quick brown fox")["input_ids"]
    model = pool.load_model("model_b", torch_dtype="float32")
    out = pool.save_model(model, tmp_path / "saved", save_tokenizer=True)
    again = AutoModelForCausalLM.from_pretrained(out)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(dict(again.named_parameters())[name], dict(model.named_parameters())[name])
    assert AutoTokenizer.from_pretrained(out).vocab_size == tokenizer.vocab_size
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_target_allow_list(tiny_llama_family, monkeypatch):
    monkeypatch.delenv("EVOMERGE_ALLOW_ANY_TARGET", raising=False)
    ok = _config(tiny_llama_family)
    ok["models"]["model_a"] = {"_target_": "transformers.AutoModelForCausalLM",
                               "pretrained_model_name_or_path": str(tiny_llama_family["ft0"])}
    ok["tokenizer"] = {"_target_": "transformers.AutoTokenizer", "pretrained_model_name_or_path": str(tiny_llama_family["base"])}
    pool = CausalLMPool.from_config(ok)
    assert pool.load_model("model_a").dtype == torch.bfloat16
    assert pool.load_tokenizer() is not None
    evil = {"models": {"m": {"_target_": "os.system", "command": "echo pwned"}}}
    with pytest.raises(ConfigError, match="not on the allow-list"):
        CausalLMPool.from_config(evil)
    with pytest.raises(ConfigError, match="not on the allow-list"):
        CausalLMPool(evil["models"])
    # explicit opt-in (argument or environment) builds any target
    odd = {"m": {"_target_": "collections.OrderedDict", "a": 1}}
    assert dict(CausalLMPool(odd, allow_arbitrary_targets=True).load_model("m")) == {"a": 1}
    monkeypatch.setenv("EVOMERGE_ALLOW_ANY_TARGET", "1")
    assert dict(CausalLMPool(odd).load_model("m")) == {"a": 1}


def test_reserved_names_and_problems(tiny_llama_family, tmp_path):
    with pytest.raises(ConfigError, match="reserved"):
        CausalLMPool({"_base_": str(tiny_llama_family["base"]), "a": str(tiny_llama_family["ft0"])})
    problems = pool_config_problems({
        "models": {"_x_": str(tiny_llama_family["base"]), "gone": str(tmp_path / "missing"), "bad": 3},
        "model_kwargs": {"torch_dtype": "float13"},
        "extra": 1,
    })
    text = "\n".join(problems)
    assert "models._x_" in text and "models.gone" in text and "models.bad" in text
    assert "model_kwargs.torch_dtype" in text and "extra: unknown key" in text


def test_backbone_pool_returns_decoder_layers(tiny_llama_family):
    layers = CausalLMBackbonePool.from_config(_config(tiny_llama_family)).load_model("model_a")
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 2
    assert type(layers[0]).__name__ == "LlamaDecoderLayer"


def test_peft_loading(tiny_llama_family, tmp_path):
    adapter = _lora(tiny_llama_family["base"], tmp_path / "lora")
    peft_model = load_peft_causal_lm(str(tiny_llama_family["base"]), str(adapter), torch_dtype="float32")
    assert type(peft_model).__name__.startswith("Peft")
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)
    merged = load_peft_causal_lm(str(tiny_llama_family["base"]), str(adapter), torch_dtype="float32",
                                 is_trainable=False, merge_and_unload=True)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    base = load_causal_lm(tiny_llama_family["base"])
    assert not torch.equal(dict(merged.named_parameters())[name], dict(base.named_parameters())[name])
    # load_causal_lm finds the adapter's own base; the pool accepts the loader as an allow-listed target
    via_ref = load_causal_lm(adapter, dtype="float32")
    assert torch.equal(dict(via_ref.named_parameters())[name], dict(merged.named_parameters())[name])
    pool = CausalLMPool({"_pretrained_": str(tiny_llama_family["base"]), "lora": {
        "_target_": "evomerge_opt.pool.load_peft_causal_lm", "base_model_path": str(tiny_llama_family["base"]),
        "peft_model_path": str(adapter), "torch_dtype": "float32", "is_trainable": False, "merge_and_unload": True}})
    from_pool = pool.load_model("lora")
    assert torch.equal(dict(from_pool.named_parameters())[name], dict(merged.named_parameters())[name])
    as_string = CausalLMPool({"_pretrained_": str(tiny_llama_family["base"]), "lora": str(adapter)}).load_model("lora")
    assert torch.equal(dict(as_string.named_parameters())[name], dict(merged.named_parameters())[name])
