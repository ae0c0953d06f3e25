"""Genome codec: every value type round-trips, decoding is pure, recipes have the right layout."""

from __future__ import annotations

import copy
import math

import pytest
from _search_helpers import tiny_space

from evomerge_opt.config.space import load_space
from evomerge_opt.errors import ConfigError
from evomerge_opt.search.codec import Coordinate, SearchCodec, layer_groups, path_length

FAMILY = {"base": "/m/base", "ft0": "/m/a", "ft1": "/m/b"}


@pytest.mark.parametrize("value", [0.0, 0.1, 0.5, 1.0, 1.2345, 2.0])
def test_linear_float_round_trip(value):
    c = Coordinate("w", "float", low=0.0, high=2.0)
    assert math.isclose(c.decode(c.encode(value)), value, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("value", [1e-4, 3e-3, 0.05, 0.9, 1.0])
def test_log_float_round_trip_and_spacing(value):
    c = Coordinate("lr", "float", low=1e-4, high=1.0, log=True)
    assert math.isclose(c.decode(c.encode(value)), value, rel_tol=1e-9)
    # log scale: the midpoint of the box is the geometric mean, not the arithmetic one
    assert math.isclose(c.decode(0.5), 1e-2, rel_tol=1e-9)


def test_float_encode_clips_and_decode_clips():
    c = Coordinate("w", "float", low=0.5, high=1.5)
    assert c.encode(3.0) == 1.0 and c.encode(-1.0) == 0.0
    assert c.decode(1.7) == 1.5 and c.decode(-0.2) == 0.5


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.9])
def test_mask_round_trip_and_threshold(threshold):
    c = Coordinate("m", "mask", threshold=threshold)
    assert c.decode(c.encode(True)) is True and c.decode(c.encode(False)) is False
    assert c.decode(threshold) is False  # strictly above the threshold is on
    assert c.decode(min(threshold + 1e-6, 1.0)) is True


def test_categorical_round_trip_and_edges():
    c = Coordinate("method", "categorical", choices=("ties", "dare_ties", "task_arithmetic"))
    for choice in c.choices:
        assert c.decode(c.encode(choice)) == choice
    assert c.decode(0.0) == "ties" and c.decode(1.0) == "task_arithmetic"  # floor(u n) clipped
    assert c.decode(1 / 3 - 1e-9) == "ties" and c.decode(1 / 3 + 1e-9) == "dare_ties"
    with pytest.raises(ConfigError):
        c.encode("linear")


def test_layer_groups():
    assert layer_groups("global", 4) == [0, 0, 0, 0]
    assert layer_groups("per_layer", 4) == [0, 1, 2, 3]
    from evomerge_opt.config.space import Groups

    assert layer_groups(Groups(groups=2), 4) == [0, 0, 1, 1]
    assert layer_groups(Groups(groups=3), 6) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="groups <= num_hidden_layers"):
        layer_groups(Groups(groups=5), 4)


def test_ps_codec_layout_and_recipe(tmp_path):
    data = tiny_space(FAMILY, tmp_path / "d.jsonl")
    data["ps"]["granularity"] = {"groups": 2}
    codec = SearchCodec(load_space(data), num_layers=4)
    # method (2 choices) + 2 sources x (weight, density) x 2 groups + lambda
    assert len(codec) == 1 + 2 * 2 * 2 + 1
    assert "ps.method" in codec.names and "ps.weight.a.0" in codec.names and "ps.lambda" in codec.names
    values = {"ps.method": "task_arithmetic", "ps.weight.a.0": 0.3, "ps.weight.a.1": 1.1, "ps.density.b.1": 0.4,
              "ps.lambda": 0.75}
    recipe = codec.decode(codec.encode(values))
    assert recipe["merge_method"] == "task_arithmetic"
    assert recipe["base_model"] == "/m/base"
    a, b = recipe["models"]
    assert a["model"] == "/m/a" and b["model"] == "/m/b"
    # groups expand to one value per layer (layers 0,1 -> group 0; 2,3 -> group 1)
    assert a["parameters"]["weight"] == pytest.approx([0.3, 0.3, 1.1, 1.1])
    assert b["parameters"]["density"][2:] == pytest.approx([0.4, 0.4])
    assert recipe["parameters"]["lambda"] == pytest.approx(0.75)
    assert recipe["dtype"] == "float32"


def test_fixed_values_are_not_coordinates(tmp_path):
    data = tiny_space(FAMILY, tmp_path / "d.jsonl")
    data["ps"].update(methods=["ties"], weight=1.0)
    data["ps"].pop("lambda")
    codec = SearchCodec(load_space(data), num_layers=2)
    assert codec.names == ["ps.density.a", "ps.density.b"]
    recipe = codec.decode([0.0, 1.0])
    assert recipe["merge_method"] == "ties"
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [1.0, 1.0]
    assert [m["parameters"]["density"] for m in recipe["models"]] == pytest.approx([0.3, 1.0])
    assert "lambda" not in recipe.get("parameters", {})


def test_dfs_codec_slots_masks_and_purity(tmp_path):
    space = load_space(tiny_space(FAMILY, tmp_path / "d.jsonl", kind="ps+dfs"))
    codec = SearchCodec(space, num_layers=4)
    slots = codec.slots()
    assert len(slots) == 2 * 3 * 4  # num_r x sources x layers
    assert slots[:2] == [(0, 0, 0), (0, 0, 1)] and slots[4] == (0, 1, 0)  # hop order r, m, l
    on = {(0, 0, 1), (0, 2, 3), (1, 1, 0)}
    values = {codec.slot_name("mask", r, space.dfs.sources[m], l): (r, m, l) in on for r, m, l in slots}
    values[codec.slot_name("scale", 0, "b", 3)] = 1.25
    genome = codec.encode(values)
    frozen = copy.deepcopy(genome)
    recipe = codec.decode(genome)
    assert genome == frozen and codec.decode(genome) == recipe  # pure: same genome, same recipe
    mask = recipe["layer_mask"]
    assert [(r, m, l) for r in range(2) for m in range(3) for l in range(4) if mask[r][m][l]] == sorted(on)
    assert recipe["scaling_factors"][0][2][3] == pytest.approx(1.25)
    assert path_length(recipe) == 3
    assert isinstance(recipe["model_paths"][0], dict) and recipe["model_paths"][0]["merge_method"] in ("ties", "task_arithmetic")
    assert recipe["model_paths"][1:] == ["/m/a", "/m/b"]
    assert recipe["input_layer_model"] == 0 and recipe["bias_factors"] is None


def test_empty_path_is_detected(tmp_path):
    space = load_space(tiny_space(FAMILY, tmp_path / "d.jsonl", kind="dfs"))
    codec = SearchCodec(space, num_layers=2)
    recipe = codec.decode({n: 0.0 for n in codec.names})
    assert path_length(recipe) == 0


def test_genome_checks(tmp_path):
    codec = SearchCodec(load_space(tiny_space(FAMILY, tmp_path / "d.jsonl")), num_layers=2)
    with pytest.raises(ConfigError, match="coordinates"):
        codec.decode([0.5])
    with pytest.raises(ConfigError, match="lacks coordinates"):
        codec.decode({"ps.lambda": 0.5})
    with pytest.raises(ConfigError, match="Unknown coordinates"):
        codec.encode({"nope": 1})


def test_decoded_recipes_parse(tmp_path, tiny_llama_family):
    """Decoded recipes are what `apply` takes: PS and DFS (with an inline PS model) both validate."""
    from evomerge_opt.config.recipe import load_recipe

    for kind in ("ps", "ps+dfs"):
        space = load_space(tiny_space(tiny_llama_family, tmp_path / "d.jsonl", kind=kind))
        codec = SearchCodec(space, num_layers=2)
        recipe = load_recipe(codec.decode({n: 0.9 for n in codec.names}))
        assert type(recipe).__name__ == ("PSRecipe" if kind == "ps" else "DFSRecipe")
