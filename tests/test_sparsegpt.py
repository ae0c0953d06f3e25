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


def test_column_scale_of_a_hand_computed_3x3_hessian():
    """diag(U)^2 with U = chol(H^-1) upper is, column by column, the first diagonal entry of the inverse
    of H's trailing block: [H^-1]_11, [(H[1:,1:])^-1]_11, 1/H_33. Worked by hand for
    H = [[4,2,0],[2,5,1],[0,1,3]] (det 44): 14/44, 3/14 (det of [[5,1],[1,3]] is 14), 1/3."""
    from evomerge_opt.merge.sparsify.importance import column_scale_from_hessian

    h = torch.tensor([[4.0, 2.0, 0.0], [2.0, 5.0, 1.0], [0.0, 1.0, 3.0]])
    scale = column_scale_from_hessian(h, damp=0.0)
    assert torch.allclose(scale, torch.tensor([7 / 22, 3 / 14, 1 / 3]), rtol=1e-5)
    # damping adds damp * mean(diag H) = 0.1 * 4 to the diagonal: the last column's scale is 1 / 3.4
    assert float(column_scale_from_hessian(h, damp=0.1)[2]) == pytest.approx(1 / 3.4, rel=1e-5)


def test_with_a_diagonal_hessian_importance_is_d2_times_the_input_energy():
    """H = diag(e) (uncorrelated inputs with energies e_j): U = diag(1/sqrt(e)), so the score of entry
    (i, j) is d_ij^2 * e_j. The sparsegpt mask must be the top-k of that, and scaling one input's
    energy scales its column's scores: a strongly excited input keeps more of its column."""
    from evomerge_opt.merge.sparsify.importance import column_scale_from_hessian

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 5, generator=g)
    energy = torch.tensor([1.0, 100.0, 0.25, 2.0, 0.5])
    scale = column_scale_from_hessian(torch.diag(energy), damp=0.0)
    assert torch.allclose(scale, 1 / energy, rtol=1e-5)
    sparsifier = get_sparsifier("sparsegpt")
    imp = FixedImportance({(1, "w"): scale})
    mask = sparsifier.mask(delta, 0.25, TensorContext(name="w", source_index=1, importance=imp))
    assert imp.calls == [(1, "w")]  # looked up for the source and tensor being merged
    assert int(mask.sum()) == 10  # round(0.25 * 40)
    by_energy = (delta.abs() * energy.sqrt()).reshape(-1)  # |d| sqrt(e): same order as d^2 e
    kept = set(by_energy.argsort(descending=True)[:10].tolist())
    assert set(mask.reshape(-1).nonzero().squeeze(1).tolist()) == kept
    magnitude = topk_mask(delta.abs(), 0.25)
    assert mask[:, 1].sum() > magnitude[:, 1].sum()  # the excited input wins entries from the others
    # A uniform scale of H (more calibration tokens of the same kind) changes no decision.
    uniform = FixedImportance({(1, "w"): column_scale_from_hessian(torch.diag(energy) * 7.0, damp=0.0)})
    assert torch.equal(sparsifier.mask(delta, 0.25, TensorContext(name="w", source_index=1, importance=uniform)),
                       mask)


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
