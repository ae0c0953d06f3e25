"""`evo-merge model [options] construct|test` through the CLI (in-process) on tiny Llama and Mistral configs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from evomerge_opt.cli.main import main
from evomerge_opt.config.model_config import ModelConfigSpec
from evomerge_opt.config.yamlio import save_yaml
from evomerge_opt.modeltools.options import EXCLUDED_FIELDS

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "llama": {
        "architecture": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "tie_word_embeddings": False,
    },
    "mistral": {
        "architecture": "mistral", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "sliding_window": 16, "tie_word_embeddings": True,
    },
}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output_models/ lands in the test's directory


def write_config(tmp_path: Path, arch: str, **extra) -> Path:
    path = tmp_path / f"tiny_{arch}.yaml"
    save_yaml({**TINY[arch], **extra}, path)
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["model", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def counts(out: str) -> dict[str, int]:
    """Parameter counts per group from a construct report."""
    found = {}
    for group, number in re.findall(r"^  (embeddings|attention|mlp|norms|head|routing|other|total)\s+([\d,]+)",
                                    out, flags=re.MULTILINE):
        found[group] = int(number.replace(",", ""))
    return found


def expected_counts(spec: dict) -> dict[str, int]:
    h, i, v, n = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"], spec["num_hidden_layers"]
    head_dim = h // spec["num_attention_heads"]
    kv = spec["num_key_value_heads"] * head_dim
    out = {
        "embeddings": v * h,
        "attention": n * (h * h + 2 * h * kv + h * h),
        "mlp": n * 3 * h * i,
        "norms": (2 * n + 1) * h,
        "head": 0 if spec.get("tie_word_embeddings") else v * h,
    }
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------------ help


def test_help_shows_every_dynamic_size_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["model", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for field in ModelConfigSpec.model_fields:
        if field not in EXCLUDED_FIELDS:
            assert "--" + field.replace("_", "-") in text, field
    for flag in ("--device", "--dtype", "--no-init-weights", "--load-from-checkpoint", "--gradient-checkpointing",
                 "--fuse-optim-with-backward", "--refresh-model", "--save-checkpoint", "--safetensors", "--output-file",
                 "--attn-implementation", "--output-dir", "--model-name", "--hidden-size", "--sliding-window",
                 "--tie-word-embeddings", "{construct,test}"):
        assert flag in text, flag
    with pytest.raises(SystemExit):
        main(["model", "test", "--help"])
    text = capsys.readouterr().out
    for flag in ("--batch-size", "--sequence-length", "--steps", "--lr", "--dataset", "--text-field"):
        assert flag in text, flag


# ------------------------------------------------------------------------------------------- construct


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_construct_on_meta_prints_config_and_counts_and_writes_definition(tmp_path, capsys, arch):
    config = write_config(tmp_path, arch)
    rc, out, _ = cli(capsys, "--config", str(config), "construct")
    assert rc == 0
    assert "device: meta" in out and "Weights: none (meta device" in out
    assert f"model_type='{arch}'" in out and "hidden_size: 32" in out
    assert counts(out) == expected_counts(TINY[arch])
    if TINY[arch]["tie_word_embeddings"]:
        assert "tied: lm_head.weight -> model.embed_tokens.weight" in out
    out_dir = tmp_path / "output_models" / f"tiny_{arch}"
    files = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "generation_config.json", "evomerge_model.yaml"} <= files
    assert not any(name.endswith((".safetensors", ".bin")) for name in files)  # meta: definition only
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["model_type"] == arch and saved["hidden_size"] == 32
    if arch == "mistral":
        assert saved["sliding_window"] == 16


def test_meta_construct_allocates_nothing(tmp_path):
    from evomerge_opt.modeltools import ConstructOptions, construct, make_source

    built = construct(make_source(config=str(write_config(tmp_path, "llama"))), ConstructOptions(device="meta"))
    assert all(p.device.type == "meta" for p in built.model.parameters())
    assert built.on_meta


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_size_options_override_the_config(tmp_path, capsys, arch):
    config = write_config(tmp_path, arch)
    extra = ["--sliding-window", "null"] if arch == "mistral" else []
    rc, out, _ = cli(capsys, "--config", str(config), "--hidden-size", "64", "--num-hidden-layers", "3",
                     "--num-attention-heads", "8", "--num-key-value-heads", "4", "--intermediate-size", "96",
                     "--rms-norm-eps", "1e-6", "--vocab-size", "256", "--rope-theta", "50000",
                     "--no-tie-word-embeddings", "--output-dir", str(tmp_path / "out"), *extra, "construct")
    assert rc == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_hidden_layers"], saved["num_attention_heads"]) == (64, 3, 8)
    assert (saved["num_key_value_heads"], saved["intermediate_size"], saved["vocab_size"]) == (4, 96, 256)
    assert saved["rms_norm_eps"] == 1e-6 and saved["tie_word_embeddings"] is False
    assert saved["rope_parameters"]["rope_theta"] == 50000
    if arch == "mistral":
        assert saved["sliding_window"] is None
    spec = dict(TINY[arch], hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=96, vocab_size=256, tie_word_embeddings=False)
    assert counts(out) == expected_counts(spec)


def test_size_option_errors_are_clear(tmp_path, capsys, tiny_llama_family):
    config = write_config(tmp_path, "llama")
    rc, _, err = cli(capsys, "--config", str(config), "--sliding-window", "8", "construct")
    assert rc == 2 and "sliding_window is a Mistral option" in err
    rc, _, err = cli(capsys, "--config", str(config), "--hidden-size", "30", "construct")
    assert rc == 2 and "hidden_size % num_attention_heads == 0" in err
    rc, _, err = cli(capsys, "--model", str(tiny_llama_family["base"]), "--hidden-size", "64", "construct")
    assert rc == 2 and "apply to --config only" in err
    with pytest.raises(SystemExit):
        main(["model", "--config", str(config), "--hidden-size", "big", "construct"])
    assert "--hidden-size takes an integer, but got 'big'" in capsys.readouterr().err


def test_source_must_be_exactly_one(tmp_path, capsys, tiny_llama_family):
    rc, _, err = cli(capsys, "construct")
    assert rc == 2 and "exactly one model source" in err
    rc, _, err = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "--model",
                     str(tiny_llama_family["base"]), "construct")
    assert rc == 2 and "--config, --model" in err


def test_save_checkpoint_on_meta_is_refused(tmp_path, capsys):
    rc, _, err = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "--save-checkpoint", "construct")
    assert rc == 2
    assert "--save-checkpoint needs a real device: pass --device cpu" in err
    assert not (tmp_path / "output_models").exists()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_save_checkpoint_on_cpu_writes_a_loadable_dir(tmp_path, capsys, arch, tiny_llama_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge_opt.modeltools import ConstructOptions, construct, make_source

    config = write_config(tmp_path, arch, tokenizer=str(tiny_llama_family["base"]))
    out_dir = tmp_path / "saved"
    rc, out, _ = cli(capsys, "--config", str(config), "--device", "cpu", "--save-checkpoint", "--safetensors",
                     "--seed", "3", "--output-dir", str(out_dir), "construct")
    assert rc == 0, out
    assert "Tokenizer: " in out and "eos_token: '<|endoftext|>'" in out
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    assert AutoTokenizer.from_pretrained(out_dir).eos_token == "<|endoftext|>"
    reference = construct(make_source(config=str(config)), ConstructOptions(device="cpu", seed=3)).model
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    assert ref_state.keys() == got_state.keys()
    for name, tensor in ref_state.items():
        assert torch.isfinite(got_state[name]).all(), name
        assert torch.equal(tensor, got_state[name]), name


def test_dtype_option(tmp_path, capsys):
    out_dir = tmp_path / "bf16"
    rc, out, _ = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "--device", "cpu", "--dtype",
                     "bfloat16", "--save-checkpoint", "--output-dir", str(out_dir), "construct")
    assert rc == 0 and "dtype: bfloat16" in out
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out_dir / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}  # noqa: SIM118
    rc, _, err = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "--dtype", "int3", "construct")
    assert rc == 2 and "Unknown dtype 'int3'" in err


def test_attn_implementation_option(tmp_path, capsys):
    config = str(write_config(tmp_path, "mistral"))
    rc, out, _ = cli(capsys, "--config", config, "--device", "cpu", "--attn-implementation", "eager",
                     "--output-dir", str(tmp_path / "o1"), "construct")
    assert rc == 0 and "attention: eager" in out
    rc, out, _ = cli(capsys, "--config", config, "--device", "cpu", "--output-dir", str(tmp_path / "o2"),
                     "test", "--attn-implementation", "eager", "--steps", "1", "--sequence-length", "8")
    assert rc == 0 and "attention: eager" in out
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        rc, _, err = cli(capsys, "--config", config, "--device", "cpu", "--attn-implementation",
                         "flash_attention_2", "--output-dir", str(tmp_path / "o3"), "construct")
        assert rc == 2 and "flash_attention_2 is not available here" in err


def test_output_file_option(tmp_path, capsys):
    report = tmp_path / "model_info.txt"
    rc, out, _ = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "construct", "-o", str(report))
    assert rc == 0
    assert out.strip() == f"report written to {report}"
    text = report.read_text()
    assert "Parameters (tied weights counted once):" in text and "total" in text


def test_model_name_and_max_shard_size(tmp_path, capsys):
    rc, out, _ = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "--model-name", "pico", "--device",
                     "cpu", "--save-checkpoint", "--max-shard-size", "20KB", "construct")
    assert rc == 0, out
    out_dir = tmp_path / "output_models" / "pico"
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    rc, out, _ = cli(capsys, "--model", str(out_dir), "--device", "cpu", "test", "--sequence-length", "8")
    assert rc == 0 and "Model: pico" in out and "Weights: loaded from" in out


def test_gradient_checkpointing_on_construct(tmp_path, capsys):
    rc, out, _ = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "--device", "cpu",
                     "--gradient-checkpointing", "--output-dir", str(tmp_path / "o"), "construct")
    assert rc == 0 and "Gradient checkpointing: enabled" in out


# ------------------------------------------------------------------------------------ reuse and refresh


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from evomerge_opt.modeltools.checkpoint_load import iter_checkpoint

    return dict(iter_checkpoint(directory))


def test_existing_output_dir_is_reused_and_refresh_rebuilds_it(tmp_path, capsys):
    config = str(write_config(tmp_path, "llama"))
    out_dir = tmp_path / "output_models" / "tiny_llama"
    assert cli(capsys, "--config", config, "--device", "cpu", "--save-checkpoint", "construct")[0] == 0
    first = _weights(out_dir)

    # Reused: the model comes from the output directory, not from the sources (another seed changes nothing).
    rc, out, _ = cli(capsys, "--config", config, "--device", "cpu", "--seed", "7", "--output-dir", str(out_dir),
                     "construct")
    assert rc == 0 and "reused output directory" in out and f"Weights: loaded from {out_dir}" in out
    assert all(torch.equal(first[k], v) for k, v in _weights(out_dir).items())

    # Changed sources without -r: still reused, with a warning naming the difference.
    rc, out, _ = cli(capsys, "--config", config, "--hidden-size", "64", "construct")
    assert rc == 0 and "hidden_size: 32 -> 64" in out and "pass -r" in out
    assert json.loads((out_dir / "config.json").read_text())["hidden_size"] == 32

    # -r regenerates from the sources: new size, new weights.
    rc, out, _ = cli(capsys, "--config", config, "--hidden-size", "64", "--device", "cpu", "--seed", "7",
                     "-r", "--save-checkpoint", "construct")
    assert rc == 0 and "reused" not in out
    assert json.loads((out_dir / "config.json").read_text())["hidden_size"] == 64
    assert _weights(out_dir)["model.embed_tokens.weight"].shape == (128, 64)

    # `test` reuses it too.
    rc, out, _ = cli(capsys, "--config", config, "--device", "cpu", "test", "--sequence-length", "8")
    assert rc == 0 and "reused output directory" in out


def test_non_model_output_dir_is_not_clobbered(tmp_path, capsys):
    out_dir = tmp_path / "precious"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    rc, _, err = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "--output-dir", str(out_dir),
                     "construct")
    assert rc == 2 and "holds no model" in err
    assert (out_dir / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ checkpoints and init


def test_load_from_checkpoint_is_non_strict_and_names_what_is_missing(tmp_path, capsys, tiny_llama_family):
    base = tiny_llama_family["base"]  # 2 layers, sharded safetensors with an index
    config = str(write_config(tmp_path, "llama"))
    out_dir = tmp_path / "carried"
    rc, out, _ = cli(capsys, "--config", config, "--num-hidden-layers", "3", "--device", "cpu",
                     "--no-init-weights", "--load-from-checkpoint", str(base), "--save-checkpoint",
                     "--output-dir", str(out_dir), "construct")
    assert rc == 0, out
    assert "not found in the checkpoint" in out
    missing = re.search(r"not found in the checkpoint \(left as constructed\): (.*)", out).group(1).split(", ")
    assert sorted(missing) == sorted(
        f"model.layers.2.{n}.weight" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                "mlp.down_proj", "input_layernorm", "post_attention_layernorm"))
    saved, source = _weights(out_dir), _weights(base)
    for name, tensor in source.items():
        assert torch.equal(saved[name], tensor), name


def test_load_from_checkpoint_on_meta_is_refused(tmp_path, capsys, tiny_llama_family):
    rc, _, err = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "--load-from-checkpoint",
                     str(tiny_llama_family["base"]), "construct")
    assert rc == 2 and "--load-from-checkpoint needs a real device" in err


def test_no_init_weights_skips_initialisation(tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    from evomerge_opt.modeltools import ConstructOptions, construct, make_source

    calls = []
    original = modeling_llama.LlamaPreTrainedModel._init_weights

    def spy(self, module):
        calls.append(type(module).__name__)
        return original(self, module)

    monkeypatch.setattr(modeling_llama.LlamaPreTrainedModel, "_init_weights", spy)
    source = make_source(config=str(write_config(tmp_path, "llama")))
    construct(source, ConstructOptions(device="cpu", init_weights=False))
    assert calls == []
    construct(source, ConstructOptions(device="cpu", init_weights=True))
    assert calls


# ------------------------------------------------------------------------------------------------ test


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_kick_test_on_random_tokens(tmp_path, capsys, arch):
    # Mistral: 32 tokens > sliding window 16, so the window is exercised.
    rc, out, _ = cli(capsys, "--config", str(write_config(tmp_path, arch)), "--device", "cpu", "test",
                     "--steps", "3", "--batch-size", "2", "--sequence-length", "32", "--lr", "0.05")
    assert rc == 0, out
    losses = [float(x) for x in re.findall(r"^step \d/3  loss ([\d.]+)", out, flags=re.MULTILINE)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(128)) < 0.5  # random init on random tokens: about ln(vocab)
    assert "batch 2 x 32" in out and "OK: 3 step(s)" in out


def test_kick_test_needs_a_real_device(tmp_path, capsys):
    rc, _, err = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "test")
    assert rc == 2 and "needs a real device" in err and "--device cpu" in err


def test_kick_test_with_gradient_checkpointing_gives_the_same_losses(tmp_path, capsys):
    config = str(write_config(tmp_path, "llama"))
    runs = []
    for extra in ([], ["--gradient-checkpointing"]):
        rc, out, _ = cli(capsys, "--config", config, "--device", "cpu", "--output-dir", str(tmp_path / "gc"),
                         "test", "--steps", "2", "--sequence-length", "16", *extra)
        assert rc == 0, out
        runs.append([float(x) for x in re.findall(r"loss ([\d.]+)", out)])
    assert "gradient checkpointing on" in out
    assert runs[0] == pytest.approx(runs[1], abs=1e-4)
    rc, out, _ = cli(capsys, "--config", config, "--device", "cpu", "--fuse-optim-with-backward", "--output-dir",
                     str(tmp_path / "gc"), "test", "--steps", "2", "--sequence-length", "16")
    assert rc == 0 and "optimizer fused with backward" in out
    assert [float(x) for x in re.findall(r"loss ([\d.]+)", out)] == pytest.approx(runs[0], abs=1e-4)


def test_kick_test_on_a_dataset(tmp_path, capsys, tiny_llama_family):
    data = tmp_path / "train.jsonl"
    rows = [{"body": "the quick brown fox jumps over the lazy dog"}, {"body": "what is two plus three? five."}]
    data.write_text("\n".join(json.dumps(r) for r in rows * 4) + "\n")
    rc, out, _ = cli(capsys, "--model", str(tiny_llama_family["base"]), "--device", "cpu", "test",
                     "--dataset", str(data), "--text-field", "body", "--steps", "2", "--sequence-length", "16")
    assert rc == 0, out
    assert re.search(r"data: dataset \S*train: 8 rows", out) and "OK: 2 step(s)" in out
    # No tokenizer: a clear error, never random data instead.
    rc, _, err = cli(capsys, "--config", str(write_config(tmp_path, "llama")), "--device", "cpu", "test",
                     "--dataset", str(data))
    assert rc == 2 and "--dataset needs a tokenizer" in err


def test_kick_test_fails_loudly_on_nan_weights(tmp_path, capsys, tiny_llama_family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_family["base"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan_model")
    rc, out, err = cli(capsys, "--model", str(tmp_path / "nan_model"), "--device", "cpu", "test",
                       "--sequence-length", "8")
    assert rc == 1
    assert "FAILED: loss is nan at step 1/1" in out and "FAILED" in err
    # With -o the report (up to the failure) still reaches the file.
    report = tmp_path / "kick.txt"
    rc, _, _ = cli(capsys, "--model", str(tmp_path / "nan_model"), "--device", "cpu", "test",
                   "--sequence-length", "8", "-o", str(report))
    assert rc == 1 and "FAILED: loss is nan" in report.read_text()


def test_ps_recipe_source(tmp_path, capsys, tiny_llama_family):
    recipe = tmp_path / "linear.yaml"
    save_yaml({"merge_method": "linear", "base_model": str(tiny_llama_family["base"]), "models": [
        {"model": str(tiny_llama_family["ft0"]), "parameters": {"weight": 0.5}},
        {"model": str(tiny_llama_family["ft1"]), "parameters": {"weight": 0.5}}]}, recipe)
    rc, _, err = cli(capsys, "--recipe", str(recipe), "construct")
    assert rc == 2 and "pass --device cpu" in err
    rc, out, _ = cli(capsys, "--recipe", str(recipe), "--device", "cpu", "--save-checkpoint", "construct")
    assert rc == 0, out
    merged = _weights(tmp_path / "output_models" / "linear")
    ft0, ft1 = _weights(tiny_llama_family["ft0"]), _weights(tiny_llama_family["ft1"])
    for name, tensor in merged.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.allclose(tensor, (ft0[name] + ft1[name]) / 2, atol=1e-6), name
    assert merged.keys() == ft0.keys()
    rc, out, _ = cli(capsys, "--recipe", str(recipe), "--device", "cpu", "-r", "test", "--sequence-length", "8")
    assert rc == 0 and "OK: 1 step(s)" in out


def test_zoo_and_peft_adapter_sources(tmp_path, capsys, monkeypatch, tiny_llama_family):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("EVOMERGE_ZOO", str(tiny_llama_family["base"].parent))
    rc, out, _ = cli(capsys, "--model", "zoo:ft1", "construct")
    assert rc == 0 and f"model directory {tiny_llama_family['ft1']}" in out and "device: meta" in out

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_family["base"])
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload()
    rc, out, _ = cli(capsys, "--model", str(tmp_path / "adapter"), "--device", "cpu", "--save-checkpoint",
                     "--output-dir", str(tmp_path / "merged"), "construct")
    assert rc == 0, out
    assert "merged onto its base" in out
    saved = _weights(tmp_path / "merged")
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(saved[name], tensor, atol=1e-6), name
    rc, _, err = cli(capsys, "--model", str(tmp_path / "adapter"), "construct")
    assert rc == 2 and "PEFT adapter" in err


@pytest.mark.gpu
def test_cuda_construct_and_test_in_bf16(tmp_path, capsys):
    config = str(write_config(tmp_path, "mistral"))
    rc, out, _ = cli(capsys, "--config", config, "--device", "cuda", "--dtype", "bfloat16", "--save-checkpoint",
                     "construct")
    assert rc == 0 and "device: cuda:0  dtype: bfloat16" in out
    rc, out, _ = cli(capsys, "--config", config, "--device", "cuda", "--dtype", "bfloat16", "test", "--steps", "3",
                     "--sequence-length", "64", "--gradient-checkpointing")
    assert rc == 0 and "OK: 3 step(s)" in out


def test_real_console_script(tmp_path):
    """One run of the installed `evo-merge` script (the others go through main() in-process)."""
    config = write_config(tmp_path, "mistral")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "evo-merge"), "model", "--config", str(config), "--device", "cpu", "test",
         "--steps", "2", "--sequence-length", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2" in proc.stdout and "OK: 2 step(s)" in proc.stdout
