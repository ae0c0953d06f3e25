"""ResidentMerger's magnitude index (sorted |d| per source and tensor): same bits as the selection path."""

from __future__ import annotations

import pytest
import torch

from evomerge_opt.merge import topk
from evomerge_opt.merge.methods import ResidentInputs
from evomerge_opt.merge.methods import keepers as keepers_mod
from evomerge_opt.merge.methods.keepers import ThresholdKeeper, magnitude_keeper
from evomerge_opt.merge.resident import ResidentMerger


def _recipe(family, method, weights, densities, **parameters):
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family[name]), "parameters": {"weight": w, "density": k}}
            for name, w, k in zip(("ft0", "ft1"), weights, densities)
        ],
        "parameters": {"sparsify": "magnitude", **parameters},
        "seed": 3,
    }


def _awkward(merger: ResidentMerger) -> None:
    """Task vectors with the cases the index must get right: all-zero tensors, -0.0 entries, heavy ties."""
    names = [n for n in merger._names if n.endswith("weight")]
    for name in names[0::4]:  # source 0 unchanged there (a frozen layer): every entry is +0.0
        merger._deltas[0][name].zero_()
    for name in names[1::4]:  # zeros with some -0.0
        delta = merger._deltas[1][name].view(-1)
        delta[: delta.numel() // 2] = 0.0
        delta[::3] = -0.0
    for name in names[2::4]:  # a few distinct magnitudes: thresholds fall inside large tie groups
        for deltas in merger._deltas:
            deltas[name].copy_(torch.round(deltas[name] * 200) / 200)


def _bits(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().view(torch.int32) for n, p in model.named_parameters()}


@pytest.mark.parametrize("method,rescale", [("ties", None), ("task_arithmetic", None), ("ties", "l1"),
                                            ("dare_linear", "inverse_density")])
def test_index_builds_the_same_bits_as_selection(tiny_llama_family, method, rescale):
    base, sources = str(tiny_llama_family["base"]), [str(tiny_llama_family["ft0"]), str(tiny_llama_family["ft1"])]
    indexed = ResidentMerger(base, sources, magnitude_index=True)
    plain = ResidentMerger(base, sources, magnitude_index=False)
    assert indexed.magnitude_index and not plain.magnitude_index
    for merger in (indexed, plain):
        _awkward(merger)
    extra = {"rescale": rescale} if rescale else {}
    for weights, densities in [((0.7, 0.5), (0.5, 0.3)), ((1.2, -0.4), (0.9, 0.1)), ((0.3, 0.3), (0.25, 0.75))]:
        recipe = _recipe(tiny_llama_family, method, weights, densities, **extra)
        expected = _bits(plain.build(recipe))
        got = _bits(indexed.build(recipe))
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (name, weights, densities)
    assert indexed._sorted  # the index was used (and kept)
    assert not plain._sorted


def test_auto_mode_follows_the_budget(tiny_llama_family):
    base, sources = str(tiny_llama_family["base"]), [str(tiny_llama_family["ft0"])]
    assert ResidentMerger(base, sources).magnitude_index
    assert not ResidentMerger(base, sources, magnitude_index_budget=1000).magnitude_index


def test_sorted_threshold_matches_selection_with_ties(monkeypatch):
    torch.manual_seed(0)
    signed = torch.round(torch.randn(5000) * 3) / 3  # many ties at every magnitude, -0.0 from round
    signed[:700] = 0.0
    assert bool(torch.signbit(signed[signed == 0]).any())
    unsigned = signed + 0.0  # -0.0 + 0.0 = +0.0
    base = torch.zeros_like(signed)

    class Indexed(ResidentInputs):
        def sorted_magnitude(self, index):
            return torch.sort(self._deltas[index].abs()).values

        def has_negative_zero(self, index):
            d = self._deltas[index]
            return bool(torch.signbit(d[d == 0]).any())

    wholes = 0
    for delta, density in [(d, k) for d in (signed, unsigned) for k in (0.05, 0.31, 0.5, 0.86, 0.97)]:
        plain = magnitude_keeper(ResidentInputs(base, [delta]), 0, density)
        fast = magnitude_keeper(Indexed(base, [delta]), 0, density)
        assert isinstance(fast, ThresholdKeeper)
        assert fast.whole == (fast.threshold == 0 and delta is unsigned)  # no tie bookkeeping
        wholes += fast.whole
        assert (fast.threshold, fast.ties, fast.shrink) == (plain.threshold, plain.ties, plain.shrink)
        kept = fast.trim(0, delta.numel(), delta, torch.empty_like(delta))
        reference = plain.trim(0, delta.numel(), delta, torch.empty_like(delta))
        assert torch.equal(kept.view(torch.int32), reference.view(torch.int32))
        assert int((kept != 0).sum()) <= round(density * delta.numel())
    assert wholes  # the shortcut was exercised
    # The band path for big tensors agrees too.
    monkeypatch.setattr(topk, "SAMPLE", 256)
    monkeypatch.setattr(topk, "MIN_SAMPLE", 64)
    monkeypatch.setattr(topk, "BAND_MIN_NUMEL", 1024)
    band_calls = []
    real_band = keepers_mod._threshold_by_band
    monkeypatch.setattr(keepers_mod, "_threshold_by_band", lambda *a: band_calls.append(a) or real_band(*a))
    big = magnitude_keeper(ResidentInputs(base, [signed]), 0, 0.4)
    fast = magnitude_keeper(Indexed(base, [signed]), 0, 0.4)
    assert (fast.threshold, fast.ties) == (big.threshold, big.ties)
    assert band_calls  # the band path ran
