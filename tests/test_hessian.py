"""Hessians of decoder Linear inputs, SparseGPT column scales, and the content-keyed caches."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge_opt.data.windows import TokenWindows
from evomerge_opt.errors import ConfigError
from evomerge_opt.io import hashing
from evomerge_opt.merge import task_vectors
from evomerge_opt.merge.sparsify.importance import (
    HessianImportance,
    collect_hessians,
    column_scale_from_hessian,
    decoder_linears,
    importance_from_recipe,
    importance_scores,
)
from evomerge_opt.merge.sparsify.importance import hessians as gathering
from evomerge_opt.merge.task_vectors import compute_task_vector
from evomerge_opt.zoo.random_models import TINY_LLAMA, TINY_MISTRAL, random_model


def _windows(lengths=(40, 30, 12, 25, 3), width=40, seed=0) -> TokenWindows:
    ids = torch.randint(2, 128, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, length in enumerate(lengths):
        mask[i, :length] = True
    return TokenWindows(ids, mask)


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_MISTRAL], ids=["llama", "mistral"])
def test_hessian_matches_direct_xtx(spec):
    model = random_model(spec).float()
    windows = _windows()
    linears = decoder_linears(model)
    assert len(linears) == 7 * spec.num_hidden_layers
    # Direct: capture every Linear's input in one full forward per document (no padding at all).
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: inputs[n].append(inp[0][0].detach()))
               for n, m in linears.items()]
    with torch.no_grad():
        for ids, mask in zip(windows.input_ids, windows.attention_mask):
            model(ids[mask][None])
    for h in handles:
        h.remove()
    layerwise = collect_hessians(model, windows, batch_size=2, method="layerwise")
    full = collect_hessians(model, windows, batch_size=3, method="full")
    assert set(layerwise) == set(linears) == set(full)
    for name in linears:
        x = torch.cat(inputs[name]).double()  # [N, in], N = non-pad tokens
        assert x.shape[0] == int(windows.attention_mask.sum())
        expected = (2.0 / x.shape[0]) * x.T @ x
        scale = expected.abs().max()
        assert torch.allclose(layerwise[name].double(), expected, atol=1e-5 * scale), name
        assert torch.allclose(full[name].double(), expected, atol=1e-5 * scale), name


def test_pad_tokens_never_count():
    model = random_model(TINY_LLAMA).float()
    windows = _windows()
    garbage = windows.input_ids.clone()
    garbage[~windows.attention_mask] = 1  # different pad ids under the mask
    wider = TokenWindows(torch.nn.functional.pad(garbage, (0, 7), value=5),
                         torch.nn.functional.pad(windows.attention_mask, (0, 7)))
    a = collect_hessians(model, windows, batch_size=5)
    b = collect_hessians(model, wider, batch_size=2)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_column_scale_and_importance_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    x[:, 4] = 0.0  # a dead input column
    h = (2 / 50) * x.T @ x
    scale = column_scale_from_hessian(h.float(), damp=0.01)
    # By the book: dead diag -> 1, damping 1% of the mean diagonal, U = chol(H^-1) upper.
    ref = h.clone()
    ref[4, 4] = 1.0
    ref += 0.01 * torch.diagonal(ref).mean() * torch.eye(6, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.linalg.inv(ref)).T  # upper factor: H^-1 = U^T U
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(ref))
    expected = torch.diagonal(upper) ** 2
    assert torch.allclose(scale.double(), expected, rtol=1e-4)
    delta = torch.randn(3, 6, generator=g)
    scores = importance_scores(delta, scale)
    manual = torch.tensor([[float(delta[i, j]) ** 2 / float(expected[j]) for j in range(6)] for i in range(3)])
    assert torch.allclose(scores, manual.float(), rtol=1e-4)


def test_non_positive_definite_hessian_gets_more_damping():
    h = -torch.eye(4)  # negative definite: 1% damping is not enough, more is tried
    with pytest.raises(Exception, match="not positive definite"):
        column_scale_from_hessian(h * 1e6)
    scale = column_scale_from_hessian(torch.eye(4) * 0 + torch.ones(4, 4))  # rank 1: damping makes it PD
    assert torch.isfinite(scale).all() and (scale > 0).all()


def _calib(tmp_path, texts):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return path


TEXTS = ["the quick brown fox jumps over the lazy dog", "what is two plus three? the answer is five.",
         "the lazy dog", "two plus three is five"]


def test_importance_provider_and_caches(tmp_path, tiny_llama_family, tiny_tokenizer, monkeypatch):
    calls = []
    real = gathering.compute_column_scales
    monkeypatch.setattr(gathering, "compute_column_scales", lambda *a, **k: calls.append(1) or real(*a, **k))
    calib = _calib(tmp_path, TEXTS)
    refs = [str(tiny_llama_family["ft0"]), str(tiny_llama_family["ft1"])]
    cache = tmp_path / "cache" / "hessians"

    def provider(refs=refs, data=calib):
        return HessianImportance(refs, [{"path": str(data)}], tiny_tokenizer, num_samples=None, seq_len=16,
                                 cache_dir=cache)

    imp = provider()
    name = "model.layers.1.mlp.down_proj.weight"
    scale = imp.column_scale(1, name)
    assert scale.shape == (64,) and torch.isfinite(scale).all() and (scale > 0).all()
    assert imp.column_scale(0, "model.embed_tokens.weight") is None
    assert imp.column_scale(0, "lm_head.weight") is None
    assert imp.column_scale(0, "model.norm.weight") is None
    assert len(calls) == 2
    # Matches a direct computation on the loaded model.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(refs[1]).float()
    direct = column_scale_from_hessian(collect_hessians(model, imp.calibration_windows(1))[name])
    assert torch.allclose(scale, direct, rtol=1e-4)

    # Same model + data: a new provider reads the cache, computing nothing.
    again = provider()
    assert torch.equal(again.column_scale(1, name), scale) and len(calls) == 2
    assert len(list(cache.glob("*.safetensors"))) == 2
    # Same models in another order: keyed by content, not position -> still cached.
    swapped = provider(refs=refs[::-1])
    assert torch.equal(swapped.column_scale(0, name), scale) and len(calls) == 2

    # A changed model (same path!) is recomputed.
    changed = tmp_path / "ft1_copy"
    shutil.copytree(refs[1], changed)
    shard = min(changed.glob("*.safetensors"))
    tensors = load_file(str(shard))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    provider(refs=[refs[0], str(changed)]).column_scale(1, name)
    assert len(calls) == 3
    # Changed calibration data is recomputed too.
    calib2 = tmp_path / "calib2.jsonl"
    calib2.write_text(json.dumps({"text": "a different calibration text about five foxes"}))
    provider(data=calib2).column_scale(1, name)
    assert len(calls) == 4


def test_compute_all_and_per_source(tmp_path, tiny_llama_family, tiny_tokenizer):
    a = _calib(tmp_path, TEXTS[:2])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"text": TEXTS[2]}))
    refs = [str(tiny_llama_family["ft0"]), str(tiny_llama_family["ft1"])]
    imp = HessianImportance(refs, [[{"path": str(a)}], [{"path": str(b)}]], tiny_tokenizer, per_source=True,
                            num_samples=8, seq_len=32, cache_dir=tmp_path / "h", lazy=False)
    assert len(imp.cache_files) == 2
    assert imp.calibration_windows(0).num_rows == 2 and imp.calibration_windows(1).num_rows == 1
    with pytest.raises(ConfigError, match="one dataset list per source"):
        HessianImportance(refs, [[{"path": str(a)}]], tiny_tokenizer, per_source=True)


def test_importance_from_recipe(tmp_path, tiny_llama_family, tiny_tokenizer):
    calib = _calib(tmp_path, TEXTS)
    recipe = {"merge_method": "ties", "base_model": str(tiny_llama_family["base"]),
              "models": [{"model": str(tiny_llama_family["ft0"]), "parameters": {"density": 0.5}},
                         {"model": str(tiny_llama_family["ft1"]), "parameters": {"density": 0.5}}],
              "parameters": {"sparsify": "magnitude"}}
    assert importance_from_recipe(recipe) is None
    recipe["parameters"]["sparsify"] = "sparsegpt"
    with pytest.raises(ConfigError, match="calibration"):
        importance_from_recipe(recipe)
    recipe["calibration"] = {"datasets": [{"path": str(calib)}], "num_samples": 4, "seq_len": 16}
    imp = importance_from_recipe(recipe, cache_dir=tmp_path / "h")
    assert imp.source_refs == [str(tiny_llama_family["ft0"]), str(tiny_llama_family["ft1"])]
    assert imp.column_scale(0, "model.layers.0.self_attn.q_proj.weight").shape == (32,)
    recipe["calibration"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        importance_from_recipe(recipe)


def test_task_vector_cache(tmp_path, tiny_llama_family, monkeypatch):
    base, ft = str(tiny_llama_family["base"]), str(tiny_llama_family["ft0"])
    path = compute_task_vector(base, ft, cache_dir=tmp_path / "tv")
    tv = load_file(str(path))
    from transformers import AutoModelForCausalLM

    b = AutoModelForCausalLM.from_pretrained(base).state_dict()
    x = AutoModelForCausalLM.from_pretrained(ft).state_dict()
    assert set(tv) == set(b)
    for name in tv:
        assert torch.allclose(tv[name], x[name].float() - b[name].float())
    other = compute_task_vector(base, str(tiny_llama_family["ft1"]), cache_dir=tmp_path / "tv")
    assert other != path and not torch.equal(load_file(str(other))["lm_head.weight"], tv["lm_head.weight"])
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(task_vectors, "checkpoint_files", lambda p: pytest.fail("recomputed a cached task vector"))
    assert compute_task_vector(base, ft, cache_dir=tmp_path / "tv") == path and path.stat().st_mtime_ns == mtime


def test_wanda_criterion_from_the_same_cache(tmp_path, tiny_llama_family, tiny_tokenizer):
    calib = _calib(tmp_path, TEXTS)
    refs = [str(tiny_llama_family["ft0"])]
    common = {"num_samples": None, "seq_len": 16, "cache_dir": tmp_path / "h"}
    sgpt = HessianImportance(refs, [{"path": str(calib)}], tiny_tokenizer, **common)
    wanda = HessianImportance(refs, [{"path": str(calib)}], tiny_tokenizer, criterion="wanda", **common)
    name = "model.layers.0.mlp.gate_proj.weight"
    from transformers import AutoModelForCausalLM

    from evomerge_opt.merge.sparsify.importance import damped_hessian

    model = AutoModelForCausalLM.from_pretrained(refs[0]).float()
    h = collect_hessians(model, sgpt.calibration_windows(0))[name]
    assert torch.allclose(wanda.column_scale(0, name), 1 / torch.diagonal(damped_hessian(h)), rtol=1e-5)
    assert torch.allclose(sgpt.column_scale(0, name), column_scale_from_hessian(h), rtol=1e-4)
    assert len(list((tmp_path / "h").glob("*.safetensors"))) == 1  # one Hessian pass serves both
    with pytest.raises(ConfigError, match="criterion"):
        HessianImportance(refs, [{"path": str(calib)}], tiny_tokenizer, criterion="fisher")


def test_stored_hessians_feed_obs_trim(tmp_path, tiny_llama_family, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from evomerge_opt.merge.sparsify.importance import obs_trim

    calib = _calib(tmp_path, TEXTS)
    ref = str(tiny_llama_family["ft1"])
    imp = HessianImportance([ref], [{"path": str(calib)}], tiny_tokenizer, num_samples=None, seq_len=16,
                            cache_dir=tmp_path / "h", store_hessians=True)
    name = "model.layers.1.self_attn.o_proj.weight"
    h = imp.hessian(0, name)
    model = AutoModelForCausalLM.from_pretrained(ref).float()
    assert torch.allclose(h, collect_hessians(model, imp.calibration_windows(0))[name], rtol=1e-4, atol=1e-7)
    assert imp.hessian(0, "lm_head.weight") is None
    delta = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    trimmed = obs_trim(delta, 0.3, h)
    assert torch.isfinite(trimmed).all() and int((trimmed != 0).sum()) == round(0.3 * delta.numel())
    with pytest.raises(ConfigError, match="store_hessians"):
        HessianImportance([ref], [{"path": str(calib)}], tiny_tokenizer).hessian(0, name)


def test_lora_adapter_source(tmp_path, tiny_llama_family, tiny_tokenizer):
    """A LoRA fine-tune is merged onto its base for Hessians and task vectors, and hashed with its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = str(tiny_llama_family["base"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    adapter = tmp_path / "lora"
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().state_dict()

    tv = load_file(str(compute_task_vector(base, str(adapter), cache_dir=tmp_path / "tv")))
    base_sd = AutoModelForCausalLM.from_pretrained(base).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(tv[q], merged[q] - base_sd[q], atol=1e-6) and tv[q].abs().max() > 0
    assert float(tv["model.layers.0.mlp.up_proj.weight"].abs().max()) == 0.0

    imp = HessianImportance([str(adapter)], [{"path": str(_calib(tmp_path, TEXTS))}], tiny_tokenizer,
                            num_samples=None, seq_len=16, cache_dir=tmp_path / "h", base_model=base)
    scale = imp.column_scale(0, "model.layers.1.self_attn.k_proj.weight")
    assert scale is not None and torch.isfinite(scale).all()
    assert hashing.model_content_hash(str(adapter), base) != hashing.model_content_hash(base)
