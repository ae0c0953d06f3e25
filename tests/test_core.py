"""The shared building blocks: registry, atomic writes, model references, model-config schema, CLI dispatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evomerge_opt.config.model_config import ModelConfigSpec, parse_dtype
from evomerge_opt.config.yamlio import load_yaml, save_yaml
from evomerge_opt.errors import ConfigError, EvoMergeError, ModelSourceError, UnknownNameError
from evomerge_opt.io.atomic import atomic_output_dir, atomic_write_text
from evomerge_opt.io.sources import is_peft_adapter, resolve_model_ref
from evomerge_opt.registry import Registry


def test_registry_refuses_duplicates_and_lists_valid_names():
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)

    @reg.register("b")
    def _b():
        return 2

    assert reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3)
    with pytest.raises(UnknownNameError, match=r"Unknown widget 'c'; valid widgets are: a, b"):
        reg.get("c")
    assert isinstance(UnknownNameError("x"), EvoMergeError)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path: Path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as staging:
        (staging / "done.txt").write_text("ok")
    assert (out / "done.txt").read_text() == "ok"
    with pytest.raises(FileExistsError, match="--overwrite"), atomic_output_dir(out):
        pass
    with atomic_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_yaml_roundtrip_and_errors(tmp_path: Path):
    path = save_yaml({"b": 1, "a": [1.5, True]}, tmp_path / "x.yaml", header="made by a test")
    assert path.read_text().startswith("# made by a test\n")
    assert load_yaml(path) == {"b": 1, "a": [1.5, True]}
    atomic_write_text(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    atomic_write_text(tmp_path / "evil.yaml", "!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_yaml(tmp_path / "evil.yaml")


def test_resolve_model_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EVOMERGE_ZOO", str(tmp_path / "zoo"))
    (tmp_path / "zoo" / "math").mkdir(parents=True)
    assert resolve_model_ref("zoo:math") == str(tmp_path / "zoo" / "math")
    with pytest.raises(ModelSourceError, match="evo-merge zoo build"):
        resolve_model_ref("zoo:nope")
    assert resolve_model_ref(tmp_path) == str(tmp_path.resolve())
    assert resolve_model_ref("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_ref("./no/such/dir")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert is_peft_adapter(tmp_path / "adapter") and not is_peft_adapter(tmp_path)


def test_model_config_spec():
    import torch

    spec = ModelConfigSpec(architecture="mistral", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=8, dtype="bf16")
    config = spec.to_hf_config()
    assert type(config).__name__ == "MistralConfig" and config.sliding_window == 8
    assert config.num_key_value_heads == 2 and config.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="hidden_size % num_attention_heads"):
        ModelConfigSpec(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="not a valid model config"):
        ModelConfigSpec.from_yaml_dict({"architecture": "gpt2"})
    with pytest.raises(ConfigError, match="Unknown dtype 'float8'"):
        parse_dtype("float8")
    assert parse_dtype("torch.float16") is torch.float16 and parse_dtype("auto") is None


def test_cli_help_lists_every_command_without_importing_torch():
    code = "import sys, evomerge_opt, evomerge_opt.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    result = subprocess.run([sys.executable, "-m", "evomerge_opt.cli.main", "--help"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0
    for name in ("search", "worker", "apply", "validate", "eval", "compare", "export", "dashboard", "report", "model", "zoo"):
        assert f"  {name}" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "evomerge_opt.cli.main", "frobnicate"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
