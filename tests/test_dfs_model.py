"""Evo*Affine DFS candidates built in memory: exactness, shared storage, hand-computed forward, KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge_opt.dfs.build import build_dfs_candidate
from evomerge_opt.dfs.modeling_evo_affine import (
    EvoLlamaAffineForCausalLM,
    EvoLlamaAffineForSequenceClassification,
    EvoMistralAffineForCausalLM,
    EvoMistralAffineForSequenceClassification,
)
from evomerge_opt.errors import ConfigError, ShapeMismatchError

D = 32  # hidden size of the tiny families
L = 2  # layers of the tiny families


def _load(family: dict) -> list:
    return [AutoModelForCausalLM.from_pretrained(family[k], dtype=torch.float32).eval() for k in ("base", "ft0", "ft1")]


@pytest.fixture(scope="module")
def llamas(tiny_llama_family):
    return _load(tiny_llama_family)


@pytest.fixture(scope="module")
def mistrals(tiny_mistral_family):
    return _load(tiny_mistral_family)


def _seq_cls_models(family: str, n: int = 2) -> list:
    from transformers import LlamaForSequenceClassification, MistralForSequenceClassification

    from evomerge_opt.zoo.random_models import TINY_LLAMA, TINY_MISTRAL

    spec = TINY_LLAMA if family == "llama" else TINY_MISTRAL
    cls = LlamaForSequenceClassification if family == "llama" else MistralForSequenceClassification
    config = spec.to_hf_config()
    config.num_labels = 3
    config.pad_token_id = 1
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(cls(config).eval())
    return models


def _ids(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _identity(num_models: int, model: int = 0) -> dict:
    mask = [[[m == model] * L for m in range(num_models)]]
    return {"model_paths": [f"m{i}" for i in range(num_models)], "num_r": 1, "layer_mask": mask,
            "input_layer_model": model, "output_layer_model": model}


def _no_nan(tensor: torch.Tensor) -> None:
    assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("family", ["llamas", "mistrals"])
def test_identity_path_reproduces_model_exactly(family, request):
    models = request.getfixturevalue(family)
    ids = _ids()
    for which in (0, 2):
        candidate = build_dfs_candidate(models, _identity(3, which))
        expected_cls = EvoLlamaAffineForCausalLM if family == "llamas" else EvoMistralAffineForCausalLM
        assert type(candidate) is expected_cls
        with torch.no_grad():
            got, want = candidate(ids).logits, models[which](ids).logits
        _no_nan(got)
        assert torch.equal(got, want)
    # Explicit factors of 1 and 0 (what a search writes for an untouched slot) are exact too.
    explicit = _identity(3, 0) | {"scaling_factors": [[[1.0] * L] * 3], "bias_factors": [[[0.0] * L] * 3]}
    candidate = build_dfs_candidate(models, explicit)
    assert candidate.config.scale_kinds == ["scalar"] * L and candidate.config.bias_kinds == ["scalar"] * L
    with torch.no_grad():
        assert torch.equal(candidate(ids).logits, models[0](ids).logits)


def test_candidate_references_source_layers_and_shares_repeated_layer(llamas):
    recipe = {"model_paths": ["a", "b", "c"], "num_r": 2,
              "layer_mask": [[[True, True], [False, True], [False, False]], [[True, False], [False, True], [False, False]]],
              "input_layer_model": 1, "output_layer_model": 0}
    before = {k: v.clone() for k, v in llamas[0].state_dict().items()}
    candidate = build_dfs_candidate(llamas, recipe)
    config = candidate.config
    assert config.hop_table == [[0, 0], [0, 1], [1, 1], [0, 0], [1, 1]]
    assert config.physical_layers == [[0, 0], [0, 1], [1, 1]]
    assert config.hop_to_physical == [0, 1, 2, 0, 2]
    assert config.num_hidden_layers == 5  # one KV-cache layer per hop
    layers = candidate.model.layers
    assert len(layers) == 3  # (0, 0) and (1, 1) are used twice but stored once
    assert layers[0] is llamas[0].model.layers[0] and layers[2] is llamas[1].model.layers[1]
    assert candidate.model.embed_tokens is llamas[1].model.embed_tokens
    assert candidate.lm_head is llamas[0].lm_head and candidate.model.norm is llamas[0].model.norm
    ptrs = [p.data_ptr() for p in candidate.parameters()]
    assert len(ptrs) == len(set(ptrs))  # no parameter appears twice
    source_ptrs = {p.data_ptr() for m in llamas for p in m.parameters()}
    assert set(ptrs) <= source_ptrs  # nothing copied (identity hops have no parameters)
    # Evaluating the candidate leaves the sources untouched.
    with torch.no_grad():
        _no_nan(candidate(_ids()).logits)
    assert all(torch.equal(v, llamas[0].state_dict()[k]) for k, v in before.items())
    # A later candidate from the same sources has its own config (configs come from a cached template).
    other = build_dfs_candidate(llamas, _identity(3, 2) | {"input_layer_model": 1, "output_layer_model": 0})
    assert other.config is not config and other.config.hop_table == [[2, 0], [2, 1]]
    assert config.hop_table == [[0, 0], [0, 1], [1, 1], [0, 0], [1, 1]] and config.num_hidden_layers == 5


def _hand_forward(models, path, ids, input_model, output_model, head="lm_head"):
    """Embeddings -> for each hop: h = S*h + b, source layer -> final norm -> head, calling source modules."""
    src_in, src_out = models[input_model], models[output_model]
    h = src_in.model.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    position_embeddings = src_out.model.rotary_emb(h, position_ids)
    for m, l, scale, bias in path:
        if scale is not None:
            s = torch.tensor(scale)
            h = h @ s.T if s.dim() == 2 else h * s
        if bias is not None:
            h = h + torch.tensor(bias)
        # sdpa with attention_mask=None is causal attention over the whole (short) sequence.
        h = models[m].model.layers[l](h, attention_mask=None, position_embeddings=position_embeddings,
                                      position_ids=position_ids)
    h = src_out.model.norm(h)
    return getattr(src_out, head)(h)


def _scaled_recipe(num_models: int = 3):
    gen = torch.Generator().manual_seed(3)
    vector = (1 + 0.1 * torch.randn(D, generator=gen)).tolist()
    matrix = (torch.eye(D) + 0.05 * torch.randn(D, D, generator=gen)).tolist()
    bias_vec = (0.1 * torch.randn(D, generator=gen)).tolist()
    mask = [[[True, False], [True, True], [False, False]], [[False, True], [False, False], [True, False]]]
    scales = [[[0.8, None], [vector, 1.0], [None, None]], [[None, matrix], [None, None], [1.2, None]]]
    biases = [[[None, None], [0.05, bias_vec], [None, None]], [[None, 0.0], [None, None], [bias_vec, None]]]
    recipe = {"model_paths": [f"m{i}" for i in range(num_models)], "num_r": 2, "layer_mask": mask,
              "scaling_factors": scales, "bias_factors": biases, "input_layer_model": 2, "output_layer_model": 1}
    path = [(0, 0, 0.8, None), (1, 0, vector, 0.05), (1, 1, 1.0, bias_vec), (0, 1, matrix, 0.0), (2, 0, 1.2, bias_vec)]
    return recipe, path


@pytest.mark.parametrize("family", ["llamas", "mistrals"])
def test_scaled_path_equals_hand_computed_forward(family, request):
    models = request.getfixturevalue(family)
    recipe, path = _scaled_recipe()
    candidate = build_dfs_candidate(models, recipe)
    assert candidate.config.scale_kinds == ["scalar", "vector", "scalar", "matrix", "scalar"]
    assert candidate.config.bias_kinds == ["none", "scalar", "vector", "scalar", "vector"]
    ids = _ids(1, 12)
    with torch.no_grad():
        got = candidate(ids).logits
        want = _hand_forward(models, path, ids, input_model=2, output_model=1)
    _no_nan(got)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # A different scale changes the output (the factors are really applied).
    recipe["scaling_factors"][0][0][0] = 0.5
    with torch.no_grad():
        assert not torch.allclose(build_dfs_candidate(models, recipe)(ids).logits, got)


def _generate_both(model, ids, new_tokens):
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
    return cached, uncached


@pytest.mark.parametrize("family", ["llamas", "mistrals"])
def test_generate_with_and_without_cache_agree(family, request):
    models = request.getfixturevalue(family)
    recipe, _ = _scaled_recipe()
    candidate = build_dfs_candidate(models, recipe)
    ids = _ids(1, 8, seed=5)
    # 8 + 24 = 32 tokens: twice the Mistral sliding window (16), so the window is exercised.
    cached, uncached = _generate_both(candidate, ids, 24)
    assert cached.shape == (1, 32)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        out = candidate(ids, use_cache=True)
    cache = out.past_key_values
    assert len(cache.layers) == len(candidate.config.hop_table)  # KV cache indexed by hop
    # Full cache layers on every transformers version; Mistral's window is applied by the mask.
    assert all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
    if family == "mistrals":
        assert candidate.config.sliding_window == 16
        # A cache with sliding-window layers (cropped keys) is refused, not silently mis-masked.
        from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

        sliding = DynamicCache()
        sliding.layers = [DynamicSlidingWindowLayer(sliding_window=16) for _ in candidate.config.hop_table]
        with pytest.raises(ValueError, match="non-sliding"), torch.no_grad():
            candidate(ids, past_key_values=sliding, use_cache=True)


def test_batched_left_padded_generation_matches_uncached(llamas):
    recipe, _ = _scaled_recipe()
    candidate = build_dfs_candidate(llamas, recipe)
    ids = _ids(2, 9, seed=7)
    attention_mask = torch.ones_like(ids)
    ids[0, :3] = 1
    attention_mask[0, :3] = 0  # left padding of the first row
    kwargs = {"attention_mask": attention_mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 1}
    with torch.no_grad():
        cached = candidate.generate(ids, use_cache=True, **kwargs)
        uncached = candidate.generate(ids, use_cache=False, **kwargs)
        alone = candidate.generate(ids[1:], use_cache=True, **{**kwargs, "attention_mask": attention_mask[1:]})
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[1:], alone)  # the padded row does not disturb the other one


def test_mistral_sliding_window_is_applied(mistrals):
    """Logits at position 30 depend on the window: the DFS model matches its source with the window on."""
    candidate = build_dfs_candidate(mistrals, _identity(3, 1))
    ids = _ids(1, 40, seed=9)
    with torch.no_grad():
        got = candidate(ids).logits
        want = mistrals[1](ids).logits
        cached, uncached = _generate_both(candidate, ids[:, :10], 25)
    assert torch.equal(got, want)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sequence_classification(family):
    models = _seq_cls_models(family)
    ids = _ids(2, 9)
    ids[1, -3:] = 1  # right padding in the second row
    expected_cls = EvoLlamaAffineForSequenceClassification if family == "llama" else EvoMistralAffineForSequenceClassification
    identity = build_dfs_candidate(models, _identity(2, 1))
    assert type(identity) is expected_cls and identity.score is models[1].score
    with torch.no_grad():
        assert torch.equal(identity(ids).logits, models[1](ids).logits)
    recipe = {"model_paths": ["a", "b"], "layer_mask": [[[True, True], [True, False]]],
              "scaling_factors": [[[1.1, 0.9], [0.7, None]]], "bias_factors": [[[0.0, 0.1], [0.0, None]]],
              "input_layer_model": 0, "output_layer_model": 1}
    candidate = build_dfs_candidate(models, recipe)
    one = ids[:1]
    with torch.no_grad():
        got = candidate(one).logits
        hand = _hand_forward(models, [(0, 0, 1.1, 0.0), (0, 1, 0.9, 0.1), (1, 0, 0.7, 0.0)], one, 0, 1, head="score")
        batched = candidate(ids).logits
    assert got.shape == (1, 3)
    torch.testing.assert_close(got, hand[:, -1], rtol=0, atol=1e-6)
    _no_nan(batched)


def test_mask_selecting_nothing_from_a_model_and_many_models(llamas):
    recipe = {"model_paths": ["a", "b", "c"], "num_r": 3,
              "layer_mask": [[[False, False], [True, True], [False, False]]] * 3,
              "input_layer_model": 0, "output_layer_model": 2}
    candidate = build_dfs_candidate(llamas, recipe)
    assert len(candidate.config.hop_table) == 6 and len(candidate.model.layers) == 2
    with torch.no_grad():
        _no_nan(candidate(_ids()).logits)


def test_errors_for_mismatched_models(llamas, mistrals):
    from evomerge_opt.zoo.random_models import TINY_LLAMA, random_model

    recipe = _identity(3)
    with pytest.raises(ConfigError, match="3 models for 2 model_paths"):
        build_dfs_candidate(llamas, _identity(2) | {"model_paths": ["a", "b"]} | {"layer_mask": [[[True, True], [False, False]]]})
    wide = random_model(TINY_LLAMA.model_copy(update={"hidden_size": 64, "num_attention_heads": 8}), 0)
    with pytest.raises(ShapeMismatchError, match="same hidden_size"):
        build_dfs_candidate([llamas[0], llamas[1], wide], recipe)
    big_vocab = random_model(TINY_LLAMA.model_copy(update={"vocab_size": 256}), 0)
    with pytest.raises(ShapeMismatchError, match="same vocab_size"):
        build_dfs_candidate([llamas[0], big_vocab, llamas[2]], recipe)
    with pytest.raises(ShapeMismatchError, match="share an architecture"):
        build_dfs_candidate([llamas[0], mistrals[1], llamas[2]], recipe)
    deep = random_model(TINY_LLAMA.model_copy(update={"num_hidden_layers": 3}), 0)
    with pytest.raises(ShapeMismatchError, match="has 3 decoder layers"):
        build_dfs_candidate([llamas[0], deep, llamas[2]], recipe)
    half = random_model(TINY_LLAMA.model_copy(update={"dtype": "bfloat16"}), 0)
    with pytest.raises(ShapeMismatchError, match="one dtype"):
        build_dfs_candidate([llamas[0], half, llamas[2]], recipe)
    bad_vector = _identity(3) | {"scaling_factors": [[[[1.0] * 5, 1.0], [None] * 2, [None] * 2]]}
    with pytest.raises(ShapeMismatchError, match="hidden size is 32"):
        build_dfs_candidate(llamas, bad_vector)
    bad_matrix = _identity(3) | {"scaling_factors": [[[[[1.0] * 4] * 4, 1.0], [None] * 2, [None] * 2]]}
    with pytest.raises(ShapeMismatchError, match="32x32"):
        build_dfs_candidate(llamas, bad_matrix)


def test_models_with_a_different_layer_count_are_routed_when_the_mask_says_so(llamas):
    from evomerge_opt.zoo.random_models import TINY_LLAMA, random_model

    deep = random_model(TINY_LLAMA.model_copy(update={"num_hidden_layers": 3}), 4)
    recipe = {"model_paths": ["a", "deep"], "layer_mask": [[[True, False], [False, True, True]]]}
    candidate = build_dfs_candidate([llamas[0], deep], recipe)
    assert candidate.config.hop_table == [[0, 0], [1, 1], [1, 2]]
    assert candidate.config.source_num_layers == [2, 3]
    with torch.no_grad():
        _no_nan(candidate(_ids()).logits)


@pytest.mark.gpu
def test_candidate_on_cuda_matches_and_generates(llamas):
    import copy

    models = [copy.deepcopy(m).to("cuda") for m in llamas]
    candidate = build_dfs_candidate(models, _identity(3, 0))
    assert all(p.device.type == "cuda" for p in candidate.parameters())
    ids = _ids().to("cuda")
    with torch.no_grad():
        assert torch.equal(candidate(ids).logits, models[0](ids).logits)
    recipe, _ = _scaled_recipe()
    scaled = build_dfs_candidate(models, recipe)
    assert all(p.device.type == "cuda" for p in scaled.model.hops.parameters())
    cached, uncached = _generate_both(scaled, ids[:1], 16)
    assert torch.equal(cached, uncached)
