"""DFS recipes in the seed-003 format: parsing, hop order, and every structural error (no model loaded)."""

from __future__ import annotations

import pytest

from evomerge_opt.config.dfs_recipe import DFSRecipe, load_dfs_recipe
from evomerge_opt.config.yamlio import save_yaml
from evomerge_opt.errors import ConfigError


def _recipe(**overrides):
    data = {
        "model_paths": [["model/a", None], ["model/b", None]],
        "num_r": 1,
        "layer_mask": [[[True, False, True], [False, True, False]]],
        "scaling_factors": [[[1.0, 1.0, 0.5], [1.0, 2.0, 1.0]]],
        "bias_factors": [[[0.0, 0.0, 0.1], [0.0, [0.0, 0.5, 1.0], 0.0]]],
        "input_layer_model": 0,
        "output_layer_model": 1,
    }
    data.update(overrides)
    return data


def _problems(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_dfs_recipe(data)
    return info.value.problems


def test_seed_yaml_round_trip_and_hop_order(tmp_path):
    path = save_yaml(_recipe(num_r=2, layer_mask=[[[1, 0, 1], [0, 1, 0]], [[0, 0, 0], [True, False, True]]],
                             scaling_factors=None, bias_factors=None), tmp_path / "dfs.yml")
    recipe = load_dfs_recipe(path)
    assert isinstance(recipe, DFSRecipe)
    # r, then m, then l
    assert recipe.hops() == [(0, 0, 0), (0, 0, 2), (0, 1, 1), (1, 1, 0), (1, 1, 2)]
    assert [s.path for s in recipe.sources] == ["model/a", "model/b"]
    assert [s.revision for s in recipe.sources] == [None, None]
    assert recipe.layers_per_model() == [3, 3]
    again = load_dfs_recipe(recipe.to_dict())
    assert again.hops() == recipe.hops() and again.to_dict() == recipe.to_dict()


def test_sources_plain_string_revision_and_inline_ps_recipe():
    ps = {"merge_method": "linear", "models": [{"model": "x"}, {"model": "y"}]}
    recipe = load_dfs_recipe(
        _recipe(model_paths=["plain/path", ["hub/id", "v1.0"], ps], layer_mask=[[[True], [False], [True]]],
                scaling_factors=None, bias_factors=None, output_layer_model=2)
    )
    kinds = [(s.path, s.revision, s.ps_recipe is not None) for s in recipe.sources]
    assert kinds == [("plain/path", None, False), ("hub/id", "v1.0", False), (None, None, True)]
    assert recipe.to_dict()["model_paths"][1] == ["hub/id", "v1.0"]
    assert recipe.to_dict()["model_paths"][2]["merge_method"] == "linear"


def test_matrix_scale_and_unused_null_entries_accepted():
    matrix = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    recipe = load_dfs_recipe(_recipe(scaling_factors=[[[matrix, None, 1.0], [None, [1.0, 2.0, 3.0], None]]],
                                     bias_factors=None))
    assert recipe.scale_at(0, 0, 0) == matrix and recipe.bias_at(0, 0, 0) is None


def test_mask_wrong_first_dimension_says_expected_and_got():
    (problem,) = _problems(_recipe(num_r=2))
    assert "expected shape [num_r=2][M=2][L]" in problem and "first dimension is 1" in problem


def test_mask_wrong_number_of_models():
    (problem,) = _problems(_recipe(layer_mask=[[[True, False, True]]]))
    assert "layer_mask[0]" in problem and "1 rows for 2 models" in problem


def test_mask_rows_of_different_lengths_across_repetitions():
    problems = _problems(_recipe(num_r=2, layer_mask=[[[True, True, True], [True, True, True]], [[True, True], [True]]],
                                 scaling_factors=None, bias_factors=None))
    assert any("layer_mask[1]" in p and "[3, 3]" in p and "[2, 1]" in p for p in problems)


def test_mask_non_boolean_entries():
    problems = _problems(_recipe(layer_mask=[[[True, "yes", True], [False, 2, False]]], scaling_factors=None,
                                 bias_factors=None))
    assert any("'yes'" in p for p in problems) and any("2" in p and "layer_mask[0][1]" in p for p in problems)


def test_empty_path_is_an_error():
    (problem,) = _problems(_recipe(layer_mask=[[[False] * 3, [False] * 3]], scaling_factors=None, bias_factors=None))
    assert "path is empty" in problem and "at least one entry to true" in problem


@pytest.mark.parametrize("key", ["input_layer_model", "output_layer_model"])
@pytest.mark.parametrize("value", [2, -1])
def test_input_output_model_out_of_range(key, value):
    (problem,) = _problems(_recipe(**{key: value}))
    assert key in problem and f"{key}={value}" in problem and "0..1" in problem


def test_scaling_shape_mismatch():
    problems = _problems(_recipe(scaling_factors=[[[1.0, 1.0], [1.0, 1.0, 1.0]]]))
    assert any("scaling_factors[0][0]" in p and "expected 3 entries" in p and "got 2" in p for p in problems)
    problems = _problems(_recipe(bias_factors=[[[0.0, 0.0, 0.0]]]))
    assert any("bias_factors[0]" in p and "expected 2 rows" in p for p in problems)
    problems = _problems(_recipe(scaling_factors=1.0))
    assert any("scaling_factors" in p and "shape of layer_mask" in p for p in problems)


def test_bad_factor_entries():
    problems = _problems(_recipe(
        scaling_factors=[[[[[1.0, 0.0], [0.0]], 1.0, "big"], [1.0, float("nan"), 1.0]]],
        bias_factors=[[[[[0.0]], 0.0, 0.0], [0.0, 0.0, 0.0]]],
    ))
    text = "\n".join(problems)
    assert "scaling_factors[0][0][0]: a matrix factor must be square" in text
    assert "scaling_factors[0][0][2]" in text and "'big'" in text
    assert "scaling_factors[0][1][1]" in text  # NaN
    assert "bias_factors[0][0][0]" in text  # a matrix is not a valid bias


def test_vectors_of_different_sizes():
    problems = _problems(_recipe(scaling_factors=[[[[1.0, 2.0], 1.0, [1.0, 2.0, 3.0]], [1.0, 1.0, 1.0]]]))
    assert any("sizes [2, 3]" in p for p in problems)


def test_bad_model_paths_num_r_dtype_and_unknown_key():
    problems = _problems(_recipe(model_paths=["", ["a", 3]], num_r=0, dtype="float13", extra_key=1))
    text = "\n".join(problems)
    assert "extra_key: unknown key" in text
    problems = _problems(_recipe(model_paths=["", ["a", 3]], num_r=0, dtype="float13"))
    text = "\n".join(problems)
    assert "model_paths[0]: an empty path" in text
    assert "model_paths[1]: the revision must be a string" in text
    assert "num_r >= 1" in text and "float13" in text


def test_missing_required_keys():
    problems = _problems({"num_r": 1})
    assert any(p.startswith("model_paths") for p in problems) and any(p.startswith("layer_mask") for p in problems)


def test_mapping_without_merge_method_is_not_a_source():
    problems = _problems(_recipe(model_paths=[{"models": ["x"]}, "b"]))
    assert any("inline parameter-space recipe" in p for p in problems)


def test_unsafe_yaml_tag_refused(tmp_path):
    path = tmp_path / "evil.yml"
    path.write_text("model_paths: !!python/object/apply:os.system ['echo hi']\n", encoding="utf-8")
    with pytest.raises(ConfigError):
        load_dfs_recipe(path)


def test_load_recipe_dispatches_to_dfs():
    from evomerge_opt.config.recipe import load_recipe

    assert isinstance(load_recipe(_recipe()), DFSRecipe)
