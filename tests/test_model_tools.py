"""evomerge_opt.modeltools API: kick-test failures, non-strict checkpoint loading, parameter groups."""

from __future__ import annotations

import math

import pytest
import safetensors.torch as st
import torch

from evomerge_opt.errors import ConfigError, ModelSourceError
from evomerge_opt.modeltools import (
    KickTestError,
    count_parameters,
    kick_test,
    load_checkpoint_non_strict,
    param_group,
    random_batches,
)
from evomerge_opt.modeltools.checkpoint_load import iter_checkpoint
from evomerge_opt.zoo.random_models import TINY_LLAMA, TINY_MISTRAL, random_model


@pytest.fixture
def llama():
    return random_model(TINY_LLAMA, seed=0)


def batches(vocab: int = 128):
    return random_batches(vocab, batch_size=2, seq_len=12, seed=0)


# ------------------------------------------------------------------------------------------ kick-test


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_MISTRAL], ids=["llama", "mistral"])
def test_kick_test_passes_and_reports_every_step(spec):
    model = random_model(spec, seed=1)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    seen = []
    result = kick_test(model, batches(), steps=3, lr=0.1, on_step=seen.append)
    assert [r.step for r in result.steps] == [1, 2, 3] and seen == result.steps
    assert all(math.isfinite(loss) for loss in result.losses)
    assert all(r.grad_norm > 0 and r.tokens == 24 for r in result.steps)
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)  # SGD stepped
    assert result.trainable == len(list(model.parameters()))


def test_unused_parameter_is_named(llama):
    llama.model.register_parameter("unused_probe", torch.nn.Parameter(torch.ones(4)))
    with pytest.raises(KickTestError, match=r"got no gradient after the first backward .*: model\.unused_probe$"):
        kick_test(llama, batches(), steps=2)


def test_detached_parameter_is_named(llama):
    layer = llama.model.layers[1].mlp.down_proj
    # The forward uses a detached copy of the weight: the loss never reaches the parameter.
    layer.forward = lambda x: torch.nn.functional.linear(x, layer.weight.detach())
    with pytest.raises(KickTestError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        kick_test(llama, batches(), steps=1)


def test_parameter_whose_gradient_is_always_zero_is_named(llama):
    probe = torch.nn.Parameter(torch.ones(3))
    llama.model.norm.register_parameter("zero_probe", probe)
    # Reached by autograd but with a zero gradient in every step.
    llama.model.norm.register_forward_hook(lambda mod, args, out: out + 0.0 * probe.sum())
    with pytest.raises(KickTestError, match=r"never received a non-zero gradient in 2 step\(s\): model\.norm\.zero_probe"):
        kick_test(llama, batches(), steps=2)


def test_nan_loss_fails_loudly(llama):
    with torch.no_grad():
        llama.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(KickTestError, match="loss is nan at step 1/2") as info:
        kick_test(llama, batches(), steps=2)
    assert info.value.result is not None and info.value.result.steps == []


def test_divergence_to_inf_is_caught_at_its_step(llama):
    # A huge learning rate blows the weights up after the first step; the second loss is not finite.
    with pytest.raises(KickTestError, match=r"(loss is (nan|inf)|non-finite gradient) at step [2-9]"):
        kick_test(llama, batches(), steps=6, lr=1e30)


def test_kick_test_rejects_meta_and_bad_arguments():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(TINY_LLAMA.to_hf_config())
    with pytest.raises(Exception, match="needs a real device"):
        kick_test(meta, batches(), steps=1)
    model = random_model(TINY_LLAMA)
    with pytest.raises(Exception, match="steps >= 1"):
        kick_test(model, batches(), steps=0)
    with pytest.raises(Exception, match="lr > 0"):
        kick_test(model, batches(), steps=1, lr=-1)


def test_kick_test_refuses_a_classifier():
    from transformers import AutoModelForSequenceClassification

    config = TINY_LLAMA.to_hf_config()
    config.num_labels = 2
    classifier = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(Exception, match="no language-model head"):
        kick_test(classifier, batches(), steps=1)


def test_fused_optimizer_matches_plain_sgd_and_still_names_unreached_parameters():
    plain, fused = random_model(TINY_LLAMA, seed=4), random_model(TINY_LLAMA, seed=4)
    a = kick_test(plain, batches(), steps=3, lr=0.5)
    b = kick_test(fused, batches(), steps=3, lr=0.5, fuse_optim_with_backward=True)
    assert a.losses == pytest.approx(b.losses, abs=1e-5)
    assert [s.grad_norm for s in a.steps] == pytest.approx([s.grad_norm for s in b.steps], rel=1e-4)
    for (name, x), y in zip(plain.state_dict().items(), fused.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in fused.parameters())  # freed during the backward
    assert all(not p._post_accumulate_grad_hooks for p in fused.parameters())  # hooks removed
    fused.model.register_parameter("unused_probe", torch.nn.Parameter(torch.ones(2)))
    with pytest.raises(KickTestError, match=r"model\.unused_probe"):
        kick_test(fused, batches(), steps=1, fuse_optim_with_backward=True)


def test_gradient_checkpointing_is_enabled(llama):
    kick_test(llama, batches(), steps=1, gradient_checkpointing=True)
    assert llama.is_activation_checkpointing


# ------------------------------------------------------------------------------------ checkpoint load


def test_load_safetensors_file_reports_missing_unexpected_and_mismatched(llama, tmp_path, caplog):
    source = random_model(TINY_LLAMA, seed=5)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)  # wrong shape
    state["extra.weight"] = torch.zeros(2)
    st.save_file(state, str(tmp_path / "ckpt.safetensors"))
    report = load_checkpoint_non_strict(llama, tmp_path / "ckpt.safetensors")
    assert report.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.mismatched == [("model.layers.0.mlp.down_proj.weight", (32, 64), (3, 3))]
    assert "model.layers.1.mlp.up_proj.weight" in caplog.text and "extra.weight" in caplog.text
    loaded = llama.state_dict()
    for name, tensor in state.items():
        if name in report.loaded:
            assert torch.equal(loaded[name], tensor), name
    assert len(report.loaded) == len(state) - 2


def test_load_sharded_dir_and_torch_bin(tiny_llama_family, tmp_path):
    base = tiny_llama_family["base"]  # several shards + index
    reference = dict(iter_checkpoint(base))
    model = random_model(TINY_LLAMA, seed=9)
    report = load_checkpoint_non_strict(model, base)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())

    torch.save(reference, tmp_path / "pytorch_model.bin")
    other = random_model(TINY_LLAMA, seed=10)
    report = load_checkpoint_non_strict(other, tmp_path / "pytorch_model.bin")
    assert report.missing == [] and len(report.loaded) == len(reference)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in reference.items())

    # weights_only=True: a pickle holding arbitrary objects is refused.
    torch.save({"weight": torch.zeros(1), "evil": object.__new__(Evil)}, tmp_path / "evil.pt")
    with pytest.raises(ModelSourceError, match="weights_only=True"):
        load_checkpoint_non_strict(other, tmp_path / "evil.pt")


class Evil:
    pass


def test_tied_model_loads_from_untied_checkpoint_without_false_warnings(tiny_llama_family):
    tied = random_model(TINY_LLAMA.model_copy(update={"tie_word_embeddings": True}), seed=0)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    report = load_checkpoint_non_strict(tied, tiny_llama_family["base"])  # untied: has lm_head.weight too
    assert report.missing == [] and report.unexpected == []
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # still tied after loading
    # The canonical name wins over the alias, whatever the order of the tensors in the file.
    embed = dict(iter_checkpoint(tiny_llama_family["base"]))["model.embed_tokens.weight"]
    assert torch.equal(tied.model.embed_tokens.weight, embed)


def test_tied_canonical_name_wins_in_any_file_order(tmp_path):
    tied = random_model(TINY_LLAMA.model_copy(update={"tie_word_embeddings": True}), seed=0)
    embed, head = torch.full((128, 32), 1.0), torch.full((128, 32), 2.0)
    for order in (("lm_head.weight", "model.embed_tokens.weight"), ("model.embed_tokens.weight", "lm_head.weight")):
        state = {order[0]: embed if order[0].startswith("model") else head,
                 order[1]: embed if order[1].startswith("model") else head}
        torch.save(state, tmp_path / "ckpt.pt")  # a dict keeps its insertion order through torch.save
        report = load_checkpoint_non_strict(tied, tmp_path / "ckpt.pt")
        assert torch.equal(tied.model.embed_tokens.weight, embed), order
        assert report.loaded == ["model.embed_tokens.weight"] and report.unexpected == []


def test_checkpoint_errors(llama, tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_checkpoint_non_strict(llama, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="holds no weights"):
        load_checkpoint_non_strict(llama, tmp_path / "empty")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(TINY_LLAMA.to_hf_config())
    with pytest.raises(ConfigError, match="needs a real device"):
        load_checkpoint_non_strict(meta, tmp_path / "empty")


# ---------------------------------------------------------------------------------------- param groups


@pytest.mark.parametrize("name, group", [
    ("model.embed_tokens.weight", "embeddings"),
    ("model.layers.3.self_attn.q_proj.weight", "attention"),
    ("model.layers.3.self_attn.q_norm.weight", "norms"),
    ("model.layers.3.mlp.down_proj.weight", "mlp"),
    ("model.layers.0.input_layernorm.weight", "norms"),
    ("model.norm.weight", "norms"),
    ("lm_head.weight", "head"),
    ("score.weight", "head"),
    ("model.hops.4.scale", "routing"),
    ("something.else", "other"),
])
def test_param_group(name, group):
    assert param_group(name) == group


def test_count_parameters_counts_tied_weights_once():
    tied = random_model(TINY_LLAMA.model_copy(update={"tie_word_embeddings": True}), seed=0)
    counts = count_parameters(tied)
    assert counts.total == sum(p.numel() for p in tied.parameters())  # parameters() de-duplicates
    assert counts.groups["head"] == 0 and counts.groups["embeddings"] == 128 * 32
    assert counts.tied == [("lm_head.weight", "model.embed_tokens.weight")]
    untied = count_parameters(random_model(TINY_LLAMA, seed=0))
    assert untied.total == counts.total + 128 * 32 and untied.groups["head"] == 128 * 32
