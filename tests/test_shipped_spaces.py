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


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory) -> Path:
    """The zoo's ``small`` preset (seconds): the same layout as the default zoo, smaller models."""
    from evomerge_opt.zoo.build import build_zoo
    from evomerge_opt.zoo.settings import preset

    return build_zoo(preset("small"), root=tmp_path_factory.mktemp("zoo") / "zoo", progress=False)


def test_the_default_zoo_has_the_layers_the_decode_checks_assume():
    from evomerge_opt.zoo.settings import ZooSettings

    assert ZooSettings().model.num_hidden_layers == PICO_LAYERS


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_space_sources_exist_in_a_built_zoo(path, small_zoo, monkeypatch):
    """Every `zoo:` model, tokenizer and dataset a shipped space names is produced by a zoo build."""
    from evomerge_opt.search.runner import _num_layers
    from evomerge_opt.zoo.settings import preset

    monkeypatch.setenv("EVOMERGE_ZOO", str(small_zoo))
    space = load_space(path)
    space.check_sources()  # raises ConfigError naming every missing model, tokenizer or data file
    assert _num_layers(space) == preset("small").model.num_hidden_layers  # read from the zoo's model
