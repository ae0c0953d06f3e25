"""`evo-merge validate`: kind detection, every problem at once, exit codes, no model loading."""

from __future__ import annotations

import pytest

from evomerge_opt.cli.main import main
from evomerge_opt.config.yamlio import save_yaml


@pytest.fixture(autouse=True)
def _no_model_loading(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("validate must not load models")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def _write(tmp_path, name, data):
    path = tmp_path / name
    save_yaml(data, path)
    return str(path)


def _ps(family):
    return {"merge_method": "dare_ties", "base_model": str(family["base"]),
            "models": [{"model": str(family["ft0"]), "parameters": {"weight": 0.5, "density": [0.2, 0.6]}}],
            "parameters": {"rescale": "l1"}}


def test_valid_files_of_every_kind(tiny_llama_family, tmp_path, capsys):
    files = [
        _write(tmp_path, "ps.yml", _ps(tiny_llama_family)),
        _write(tmp_path, "model.yml", {"architecture": "mistral", "hidden_size": 64, "num_attention_heads": 4,
                                       "sliding_window": 32}),
        _write(tmp_path, "pool.yml", {"models": {"_pretrained_": str(tiny_llama_family["base"]),
                                                 "a": str(tiny_llama_family["ft0"])},
                                      "model_kwargs": {"torch_dtype": "bfloat16"}}),
        _write(tmp_path, "dfs.yml", {"model_paths": [str(tiny_llama_family["ft0"]), str(tiny_llama_family["ft1"])],
                                     "num_r": 1, "layer_mask": [[[1, 1], [0, 1]]],
                                     "scaling_factors": [[[1.0, 1.0], [1.0, 1.0]]]}),
    ]
    assert main(["validate", *files]) == 0
    out = capsys.readouterr().out
    for kind in ("parameter-space recipe", "model config", "model pool", "data-flow-space recipe"):
        assert f"OK: {kind}" in out


def test_every_problem_reported_and_exit_one(tiny_llama_family, tmp_path, capsys):
    bad = _ps(tiny_llama_family)
    bad["merge_method"] = "ties"
    bad["models"][0]["parameters"]["density"] = 2.0
    bad["models"].append({"model": str(tmp_path / "missing_model")})
    bad["parameters"] = {"rescale": "l7", "normalize": "yes"}
    good = _write(tmp_path, "good.yml", _ps(tiny_llama_family))
    assert main(["validate", _write(tmp_path, "bad.yml", bad), good]) == 1
    captured = capsys.readouterr()
    assert "bad.yml (parameter-space recipe): 4 problem(s)" in captured.err
    for fragment in ("density=2.0", "missing_model", "parameters.rescale", "parameters.normalize"):
        assert fragment in captured.err
    assert "good.yml: OK: parameter-space recipe" in captured.out


def test_bad_pool_model_config_search_space_and_unknown(tiny_llama_family, tmp_path, capsys):
    pool = _write(tmp_path, "pool.yml", {"models": {"_weird_": str(tiny_llama_family["base"]),
                                                    "m": {"_target_": "os.system", "command": "true"}}})
    model = _write(tmp_path, "model.yml", {"architecture": "gpt9", "hidden_size": -1})
    space = _write(tmp_path, "space.yml", {"kind": "ps", "pool": {"models": {"a": str(tiny_llama_family["ft0"])}},
                                           "ps": {"weight": {"low": 2.0, "high": 1.0}}})
    unknown = _write(tmp_path, "what.yml", {"hello": "world"})
    assert main(["validate", pool, model, space, unknown]) == 1
    err = capsys.readouterr().err
    assert "pool.yml (model pool): 2 problem(s)" in err and "reserved" in err and "allow-list" in err
    assert "model.yml (model config)" in err and "architecture" in err and "hidden_size" in err
    assert "space.yml (search space)" in err
    assert "what.yml: 1 problem(s)" in err and "cannot tell what this file is" in err


def test_missing_and_malformed_files(tmp_path, capsys):
    broken = tmp_path / "broken.yml"
    broken.write_text("merge_method: [unclosed\n")
    assert main(["validate", str(tmp_path / "absent.yml"), str(broken)]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "not valid YAML" in err
