"""Merge methods against small hand-computed tensors, DARE determinism, exact magnitude trimming."""

from __future__ import annotations

import pytest
import torch

from evomerge_opt.errors import ConfigError, NonFiniteResultError, UnknownNameError
from evomerge_opt.merge._base import TensorContext, topk_mask
from evomerge_opt.merge.methods import (
    METHODS,
    ResidentInputs,
    StreamInputs,
    TensorParams,
    get_method,
    merge_tensors,
)
from evomerge_opt.merge.methods.keepers import full_mask, magnitude_keeper
from evomerge_opt.merge.sparsify import SPARSIFIERS

B = torch.zeros(4)
D1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
D2 = torch.tensor([-1.0, -1.0, 2.0, -4.0])
MAG = SPARSIFIERS.get("magnitude")
RND = SPARSIFIERS.get("random")


def params(weights, densities=None, sparsifier=None, **kw) -> TensorParams:
    return TensorParams(list(weights), list(densities or [1.0] * len(weights)), sparsifier=sparsifier, **kw)


def test_registry_lists_every_method_and_refuses_unknown():
    assert METHODS.names() == ["dare_linear", "dare_ties", "linear", "task_arithmetic", "ties"]
    with pytest.raises(UnknownNameError, match="valid merge methods are: dare_linear, dare_ties, linear"):
        get_method("slerp")


def test_ties_untrimmed_hand_computed():
    # sum = [0, -3, 5, -3.5] -> s = [+, -, +, -]; m1 = [T, T, T, F], m2 = [F, T, T, T]
    out = merge_tensors("ties", B, [D1, D2], params([1, 1]))
    torch.testing.assert_close(out, torch.tensor([1.0, -1.5, 2.5, -4.0]))


def test_ties_weighted_hand_computed():
    # w t: [2,-4,6,1], [-1,-1,2,-4]; sum [1,-5,8,-3]; num [2,-5,8,-4]; den [2,3,3,1]
    out = merge_tensors("ties", B, [D1, D2], params([2, 1]))
    torch.testing.assert_close(out, torch.tensor([1.0, -5 / 3, 8 / 3, -4.0]))


def test_ties_trim_pruned_zeros_never_agree_and_den_zero_is_one():
    # density 0.5 of 4 -> keep 2: t1 = [0,-2,3,0], t2 = [0,0,2,-4]; entry 0: no agreeing source -> den 1
    p = params([1, 1], [0.5, 0.5], MAG)
    out = merge_tensors("ties", B + 1.0, [D1, D2], p)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, 3.5, -3.0]))


def test_ties_normalize_off_and_lambda():
    p = params([1, 1], [0.5, 0.5], MAG, normalize=False, lam=0.5)
    out = merge_tensors("ties", B, [D1, D2], p)
    torch.testing.assert_close(out, 0.5 * torch.tensor([0.0, -2.0, 5.0, -4.0]))


def test_ties_elect_counts_zero_sum_as_positive():
    out = merge_tensors("ties", torch.zeros(1), [torch.tensor([1.0]), torch.tensor([-1.0])], params([1, 1]))
    torch.testing.assert_close(out, torch.tensor([1.0]))


def test_task_arithmetic_and_linear_hand_computed():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = merge_tensors("task_arithmetic", base, [D1, D2], params([0.5, 0.25], normalize=False, lam=2.0))
    torch.testing.assert_close(out, base + 2.0 * (0.5 * D1 + 0.25 * D2))
    x1, x2 = base + D1, base + D2
    out = merge_tensors("linear", base, [D1, D2], params([3, 1]))
    torch.testing.assert_close(out, (3 * x1 + x2) / 4)
    out = merge_tensors("linear", base, [D1, D2], params([3, 1], normalize=False))
    torch.testing.assert_close(out, 3 * x1 + x2)


def test_normalize_with_non_positive_total_weight_is_an_error():
    with pytest.raises(ConfigError, match="total weight must be > 0"):
        merge_tensors("linear", B, [D1, D2], params([1, -1]))


def _dare_expected(base, deltas, weights, densities, seed, name, rescale="inverse_density"):
    total = torch.zeros_like(base)
    for i, (d, w, k) in enumerate(zip(deltas, weights, densities)):
        mask = RND.mask(d, k, TensorContext(name=name, source_index=i, seed=seed))
        kept = d * mask
        if rescale == "inverse_density":
            kept = kept / k
        elif rescale == "l1":
            kept = kept * d.abs().sum() / kept.abs().sum()
        total += w * kept
    return total


@pytest.mark.parametrize("rescale", ["inverse_density", "l1", "none"])
def test_dare_linear_matches_mask_and_rescale(rescale):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 8, generator=g)
    deltas = [torch.randn(64, 8, generator=g) for _ in range(2)]
    ctxs = [TensorContext(name="w", source_index=i, seed=7) for i in range(2)]
    p = params([0.6, 0.4], [0.3, 0.7], RND, normalize=False, rescale=rescale)
    out = merge_tensors("dare_linear", base, deltas, p, ctxs)
    expected = base + _dare_expected(base, deltas, [0.6, 0.4], [0.3, 0.7], 7, "w", rescale)
    torch.testing.assert_close(out, expected)


def test_dare_is_deterministic_per_seed_and_differs_across_seeds():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, generator=g)
    deltas = [torch.randn(300, generator=g) for _ in range(2)]
    p = params([1, 1], [0.5, 0.5], RND, rescale="inverse_density")

    def run(seed):
        ctxs = [TensorContext(name="t", source_index=i, seed=seed) for i in range(2)]
        return merge_tensors("dare_ties", base, deltas, p, ctxs)

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_dare_ties_equals_ties_on_the_same_rescaled_masked_deltas():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(200, generator=g)
    deltas = [torch.randn(200, generator=g) for _ in range(3)]
    ctxs = [TensorContext(name="t", source_index=i, seed=0) for i in range(3)]
    dens = [0.5, 0.4, 0.9]
    out = merge_tensors("dare_ties", base, deltas, params([1, 2, 1], dens, RND, rescale="inverse_density"), ctxs)
    trimmed = [d * RND.mask(d, k, c) / k for d, k, c in zip(deltas, dens, ctxs)]
    expected = merge_tensors("ties", base, trimmed, params([1, 2, 1]))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_keeper_equals_topk_mask_on_large_tensors(ties):
    # >= BAND_MIN_NUMEL entries takes the sampled-band path; integer values force many ties at the threshold.
    g = torch.Generator().manual_seed(3)
    n = 300_001
    delta = torch.randint(-6, 7, (n,), generator=g).float() if ties else torch.randn(n, generator=g)
    base = torch.randn(n, generator=g)
    inputs = ResidentInputs(base, [delta])
    for density in (0.05, 0.3, 0.77):
        mask = full_mask(inputs, 0, magnitude_keeper(inputs, 0, density))
        expected = topk_mask(delta.abs(), density)
        assert int(mask.sum()) == round(density * n)
        assert torch.equal(mask, expected)


def test_stream_inputs_from_bf16_equal_resident_float32():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(200_000, generator=g).bfloat16()
    xs = [(base.float() + 0.01 * torch.randn(200_000, generator=g)).bfloat16() for _ in range(2)]
    p = params([0.5, 0.5], [0.3, 0.3], MAG)
    ctxs = [TensorContext(name="e", source_index=i) for i in range(2)]
    out_stream = torch.empty(200_000, dtype=torch.bfloat16)
    get_method("ties").merge(StreamInputs(base, xs), p, ctxs, out_stream)
    b32 = base.float()
    out_res = torch.empty(200_000, dtype=torch.bfloat16)
    get_method("ties").merge(ResidentInputs(b32, [x.float() - b32 for x in xs]), p, ctxs, out_res)
    assert torch.equal(out_stream, out_res)


def test_non_finite_result_names_the_tensor():
    bad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(NonFiniteResultError, match="'model.layers.0.mlp.up_proj.weight'"):
        merge_tensors("task_arithmetic", B, [bad, D2], params([1, 1], normalize=False),
                      name="model.layers.0.mlp.up_proj.weight")
    out = torch.empty(4, dtype=torch.float16)
    huge = torch.full((4,), 60000.0)
    with pytest.raises(NonFiniteResultError):
        get_method("task_arithmetic").merge(
            ResidentInputs(torch.zeros(4), [huge, huge]), params([1, 1], normalize=False),
            [TensorContext(name="t", source_index=i) for i in range(2)], out)


def test_l1_rescale_with_magnitude_trimming_on_a_large_tensor():
    g = torch.Generator().manual_seed(5)
    n = 200_000
    base = torch.randn(n, generator=g)
    deltas = [torch.randn(n, generator=g) for _ in range(2)]
    p = params([1.0, 0.5], [0.2, 0.6], MAG, normalize=False, rescale="l1")
    out = merge_tensors("dare_linear", base, deltas, p)
    expected = base.clone()
    for d, w, k in zip(deltas, [1.0, 0.5], [0.2, 0.6]):
        kept = d * topk_mask(d.abs(), k)
        expected += w * kept * (d.abs().sum(dtype=torch.float64) / kept.abs().sum(dtype=torch.float64)).float()
    torch.testing.assert_close(out, expected)


def test_planned_writer_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file

    from evomerge_opt.io.checkpoint import CheckpointReader
    from evomerge_opt.io.writer import PlannedShardWriter, parse_size

    assert parse_size("2GB") == 2_000_000_000 and parse_size("1KiB") == 1024
    with pytest.raises(ConfigError):
        parse_size("lots")
    tensors = {
        "a.weight": torch.randn(40, 30).bfloat16(),
        "b.bias": torch.randn(7),
        "c.ids": torch.arange(5, dtype=torch.int64),
        "d.flag": torch.tensor([True, False, True]),
        "e.half": torch.randn(3, 3).half(),
    }
    (tmp_path / "config.json").write_text("{}")
    writer = PlannedShardWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], "1KB")
    for name in reversed(list(tensors)):  # any order
        writer.write(name, tensors[name])
    files = writer.finish()
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = {}
    for file in files:
        loaded.update(load_file(file))
    reader = CheckpointReader(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
        assert torch.equal(reader.get_tensor(name), tensor)
        assert reader.shape(name) == tuple(tensor.shape) and reader.dtype(name) == tensor.dtype
    reader.close()
