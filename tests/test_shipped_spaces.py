"""Every search space shipped under search_spaces/ validates and decodes to recipes of the right shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge_opt.config.space import load_space
from evomerge_opt.search.baselines import make_baselines
from evomerge_opt.search.codec import SearchCodec, path_length

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))
PICO_LAYERS = 4  # the pico zoo's models


def test_the_three_spaces_are_shipped():
    assert {p.name for p in SPACES} >= {"ps.yaml", "dfs.yaml", "ps_dfs.yaml"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_space_validates_and_decodes(path):
    space = load_space(path)
    assert space.study, "shipped spaces name their study"
    codec = SearchCodec(space, num_layers=PICO_LAYERS)
    assert len(codec) > 0
    for u in (0.0, 0.5, 1.0):
        recipe = codec.decode({n: u for n in codec.names})
        assert ("merge_method" in recipe) == (space.kind == "ps")
    if space.dfs is not None:
        assert len(codec.slots()) == space.dfs.num_r * len(space.dfs.sources) * PICO_LAYERS
        assert path_length(codec.decode({n: 1.0 for n in codec.names})) == len(codec.slots())
    names = [b.name for b in make_baselines(space, codec)]
    assert len(names) == len(set(names)) >= 2
    for ref in space.pool.models.values():
        assert ref.startswith("zoo:"), "shipped spaces run on the pico zoo as they are"


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_space_sources_exist_when_the_zoo_is_built(path):
    from evomerge_opt.paths import zoo_root

    if not (zoo_root() / "base").is_dir():
        pytest.skip(f"pico zoo not built at {zoo_root()} (set EVOMERGE_ZOO to check the sources)")
    space = load_space(path)
    space.check_sources()
    from evomerge_opt.search.runner import _num_layers

    assert _num_layers(space) == PICO_LAYERS
