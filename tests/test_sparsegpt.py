"""The `sparsegpt` sparsifier: registry, formula, magnitude fallback, clear error, and in a TIES merge."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.merge._base import TensorContext, topk_mask
from evomerge_opt.merge.sparsify import SPARSIFIERS, get_sparsifier


class FixedImportance:
    def __init__(self, scales: dict[tuple[int, str], torch.Tensor]) -> None:
        self.scales = scales
        self.calls: list[tuple[int, str]] = []

    def column_scale(self, source_index, tensor_name):
        self.calls.append((source_index, tensor_name))
        return self.scales.get((source_index, tensor_name))


def test_registered_lazily():
    sparsifier = get_sparsifier("sparsegpt")
    assert "sparsegpt" in SPARSIFIERS and sparsifier.name == "sparsegpt"


def test_mask_keeps_top_k_by_d2_over_diag_u2():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 5, generator=g)
    scale = torch.tensor([1.0, 0.01, 4.0, 0.5, 2.0])
    imp = FixedImportance({(1, "w"): scale})
    mask = get_sparsifier("sparsegpt").mask(delta, 0.25, TensorContext(name="w", source_index=1, importance=imp))
    assert imp.calls == [(1, "w")]
    assert int(mask.sum()) == 10  # round(0.25 * 40)
    scores = delta ** 2 / scale[None, :]
    assert torch.equal(mask, topk_mask(scores, 0.25))
    kept_min = scores[mask].min()
    assert bool((scores[~mask] <= kept_min).all())
    # The column with tiny diag(U)^2 (strongly excited input) is favoured over magnitude's choice.
    assert not torch.equal(mask, topk_mask(delta.abs(), 0.25))
    assert mask[:, 1].sum() > topk_mask(delta.abs(), 0.25)[:, 1].sum()


def test_fallbacks_and_errors():
    delta = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    sparsifier = get_sparsifier("sparsegpt")
    imp = FixedImportance({})
    mask = sparsifier.mask(delta, 0.5, TensorContext(name="model.embed_tokens.weight", source_index=0, importance=imp))
    assert torch.equal(mask, topk_mask(delta.abs(), 0.5))
    norm = torch.randn(4)
    assert torch.equal(sparsifier.mask(norm, 0.5, TensorContext(name="n", source_index=0, importance=imp)),
                       topk_mask(norm.abs(), 0.5))
    with pytest.raises(ConfigError, match="calibration"):
        sparsifier.mask(delta, 0.5, TensorContext(name="w", source_index=0))


def test_ties_sparsegpt_merge_end_to_end(tmp_path, tiny_llama_family, tiny_tokenizer):
    """A TIES recipe with `sparsify: sparsegpt` merges, differs from magnitude, and has no NaN/missing tensor."""
    from evomerge_opt.api import merge_recipe
    from evomerge_opt.merge.sparsify.importance import HessianImportance

    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": t}) for t in
                               ["the quick brown fox jumps over the lazy dog", "what is two plus three? five."]))
    fam = tiny_llama_family
    recipe = {"merge_method": "ties", "base_model": str(fam["base"]),
              "models": [{"model": str(fam["ft0"]), "parameters": {"weight": 1.0, "density": 0.2}},
                         {"model": str(fam["ft1"]), "parameters": {"weight": 1.0, "density": 0.2}}],
              "parameters": {"sparsify": "sparsegpt"}, "dtype": "float32"}
    imp = HessianImportance([str(fam["ft0"]), str(fam["ft1"])], [{"path": str(calib)}], tiny_tokenizer,
                            seq_len=32, cache_dir=tmp_path / "h")
    with pytest.raises(ConfigError, match="sparsegpt"):
        merge_recipe(recipe)
    sgpt = merge_recipe(recipe, importance=imp).state_dict()
    recipe["parameters"]["sparsify"] = "magnitude"
    mag = merge_recipe(recipe).state_dict()
    assert set(sgpt) == set(mag)
    for name, tensor in sgpt.items():
        assert torch.isfinite(tensor).all(), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sgpt[q], mag[q])  # Linear weights: importance changes what is kept
    assert torch.equal(sgpt["model.norm.weight"], mag["model.norm.weight"])  # non-Linear: magnitude


def test_obs_trim_compensates_the_output_error():
    from evomerge_opt.merge.sparsify.importance import obs_trim

    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated inputs
    h = (2 / 200) * x.T @ x
    delta = torch.randn(8, 16, generator=g)
    trimmed = obs_trim(delta, 0.25, h, blocksize=8)
    kept = trimmed != 0
    assert int(kept.sum()) == 2 * round(0.25 * 8 * 8)  # two blocks of 8 columns, 25% kept in each
    plain = delta * kept  # the same mask without the update
    err_obs = ((delta - trimmed) @ x.T).pow(2).sum()
    err_plain = ((delta - plain) @ x.T).pow(2).sum()
    assert err_obs < 0.9 * err_plain
    # With H = I there is nothing to compensate: OBS trimming is magnitude trimming per block.
    eye = obs_trim(delta, 0.5, torch.eye(16) * 2, blocksize=16)
    assert torch.equal(eye != 0, topk_mask(delta.abs(), 0.5)) and torch.allclose(eye[eye != 0], delta[eye != 0])


def test_recipe_calibration_drives_apply_and_merge(tmp_path, tiny_llama_family):
    """`calibration:` in a recipe is all `evo-merge apply` and `merge_recipe()` need for `sparsify: sparsegpt`;
    both paths give the same tensors, and they differ from magnitude trimming."""
    from safetensors.torch import load_file

    from evomerge_opt.api import merge_recipe
    from evomerge_opt.cli.main import main
    from evomerge_opt.config.yamlio import save_yaml

    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": t}) for t in
                               ["the quick brown fox jumps over the lazy dog", "what is two plus three? five."]))
    fam = tiny_llama_family
    recipe = {"merge_method": "ties", "base_model": str(fam["base"]),
              "models": [{"model": str(fam["ft0"]), "parameters": {"weight": 1.0, "density": 0.2}},
                         {"model": str(fam["ft1"]), "parameters": {"weight": 1.0, "density": 0.2}}],
              "parameters": {"sparsify": "sparsegpt"}, "dtype": "float32",
              "calibration": {"datasets": [{"path": str(calib)}], "seq_len": 32}}
    save_yaml(recipe, tmp_path / "r.yaml")
    assert main(["apply", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    applied = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        applied.update(load_file(shard))
    in_memory = merge_recipe(recipe).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(applied[q], in_memory[q])
    recipe["parameters"]["sparsify"] = "magnitude"
    assert not torch.equal(merge_recipe(recipe).state_dict()[q], applied[q])
    for name, tensor in applied.items():
        assert torch.isfinite(tensor).all(), name
