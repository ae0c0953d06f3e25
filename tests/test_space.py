"""Search-space schema and rules: every problem reported at once, with the rule and the value."""

from __future__ import annotations

import pytest
from _search_helpers import tiny_space

from evomerge_opt.config.space import Range, SearchSpace, default_study_name, load_space
from evomerge_opt.errors import ConfigError

FAMILY = {"base": "/m/base", "ft0": "/m/a", "ft1": "/m/b"}


def test_valid_space_round_trips_through_plain_data(tmp_path):
    space = load_space(tiny_space(FAMILY, tmp_path / "d.jsonl", kind="ps+dfs"))
    assert isinstance(space, SearchSpace)
    assert space.kind == "ps+dfs" and space.has_ps and space.has_dfs
    assert space.ps_sources() == ["a", "b"]
    assert isinstance(space.ps.lambda_, Range) and space.ps.lambda_.low == 0.5
    again = load_space(space.to_dict())
    assert again == space
    assert again.to_dict()["ps"]["lambda"] == {"low": 0.5, "high": 1.5, "log": False}


def test_every_problem_is_reported_at_once(tmp_path):
    data = tiny_space(FAMILY, tmp_path / "d.jsonl", kind="ps+dfs")
    data["ps"]["methods"] = ["ties", "nope"]
    data["ps"]["density"] = {"low": 0.0, "high": 1.5}
    data["dfs"]["sources"] = ["a", "zzz"]  # no 'ps', unknown model
    data["dfs"]["scaling"] = {"low": 0.0, "high": 1.0, "log": True}
    data["sampler"]["name"] = "simulated_annealing"
    with pytest.raises(ConfigError) as info:
        load_space(data)
    text = "\n".join(info.value.problems)
    assert "unknown merge method 'nope'" in text
    assert "0 < density <= 1" in text
    assert "add 'ps' to dfs.sources" in text
    assert "'zzz' is not a pool model" in text
    assert "log range needs `low > 0`" in text
    assert "unknown sampler 'simulated_annealing'" in text
    assert len(info.value.problems) >= 6


def test_schema_errors_name_the_key(tmp_path):
    data = tiny_space(FAMILY, tmp_path / "d.jsonl")
    data["ps"]["wieght"] = {"low": 0, "high": 1}
    del data["fitness"]
    with pytest.raises(ConfigError) as info:
        load_space(data)
    text = "\n".join(info.value.problems)
    assert "ps.wieght: unknown key" in text
    assert "fitness: required key is missing" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fitness": {"multi_objective": True}, "sampler": {"name": "cmaes"}}, "optimises one objective"),
        ({"fitness": {"multi_objective": True}, "pruner": {"name": "median"}, "sampler": {"name": "nsgaii"}},
         "cannot prune multi-objective"),
        ({"pruner": {"name": "threshold"}}, "needs `upper`"),
        ({"kind": "dfs"}, "needs a `dfs:` section"),
        ({"study": "bad/name"}, "study: must match"),
    ],
)
def test_cross_field_rules(tmp_path, change, message):
    data = tiny_space(FAMILY, tmp_path / "d.jsonl")
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    with pytest.raises(ConfigError, match=message):
        load_space(data)


def test_dfs_only_space_needs_no_base_and_rejects_ps_source(tmp_path):
    data = tiny_space(FAMILY, tmp_path / "d.jsonl", kind="dfs")
    space = load_space(data)
    assert space.dfs.sources == ["a", "b"]
    data["dfs"]["sources"] = ["ps", "a"]
    with pytest.raises(ConfigError, match="only available with kind ps\\+dfs"):
        load_space(data)


def test_check_sources_reports_missing_models_and_data(tmp_path):
    space = load_space(tiny_space(FAMILY, tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError) as info:
        space.check_sources()
    text = "\n".join(info.value.problems)
    assert "pool.models._pretrained_" in text and "missing.jsonl" in text


def test_default_study_name(tmp_path):
    space = load_space(tiny_space(FAMILY, tmp_path / "d.jsonl"))
    assert default_study_name(space, "search_spaces/my_space.yaml") == "my_space"
    named = load_space({**space.to_dict(), "study": "given"})
    assert default_study_name(named, "x.yaml") == "given"
