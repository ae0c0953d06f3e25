"""Pico zoo: deterministic, cached, atomic, loadable with plain transformers; data layout and cipher."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.zoo import build as zoo_build
from evomerge_opt.zoo.build import build_zoo, read_manifest
from evomerge_opt.zoo.cipher import WordCipher
from evomerge_opt.zoo.corpus import iter_docstrings, normalize
from evomerge_opt.zoo.settings import ZooSettings, preset
from evomerge_opt.zoo.tasks import TASKS

MODELS = ("base", "math", "lang", "base_mistral", "math_mistral", "lang_mistral")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "zoo.json"
    }


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory) -> Path:
    return build_zoo(preset("small"), root=tmp_path_factory.mktemp("zoo") / "zoo", progress=False)


def test_layout_and_manifest(small_zoo: Path) -> None:
    manifest = read_manifest(small_zoo)
    assert manifest["settings_hash"] == preset("small").settings_hash()
    assert manifest["target_task"] == "math_lang"
    assert set(manifest["models"]) == set(MODELS)
    for name in MODELS:
        assert (small_zoo / name / "model.safetensors").is_file()
        assert (small_zoo / name / "tokenizer.json").is_file()
    for task in TASKS:
        for split in ("dev", "test"):
            rows = [json.loads(line) for line in (small_zoo / "data" / task / f"{split}.jsonl").read_text().splitlines()]
            assert rows and all(r["text"].strip() for r in rows)
            if task.startswith("math"):
                assert all(r["text"] == f"{r['prompt']} {r['answer']}." for r in rows)
    assert not (small_zoo / "data" / "math_lang" / "train.jsonl").exists()  # the target is never trained on
    # held-out: no dev/test question of math_en is in its train set
    train = {json.loads(x)["prompt"] for x in (small_zoo / "data/math_en/train.jsonl").read_text().splitlines()}
    for split in ("dev", "test"):
        held = {json.loads(x)["prompt"] for x in (small_zoo / f"data/math_en/{split}.jsonl").read_text().splitlines()}
        assert not held & train


def test_math_lang_is_the_cipher_of_math_en(small_zoo: Path) -> None:
    cipher = WordCipher.load(small_zoo / "data" / "cipher.json")
    en = [json.loads(x) for x in (small_zoo / "data/math_en/test.jsonl").read_text().splitlines()]
    lang = [json.loads(x) for x in (small_zoo / "data/math_lang/test.jsonl").read_text().splitlines()]
    assert [cipher.decipher(r["prompt"]) for r in lang] == [r["prompt"] for r in en]
    assert [r["answer"] for r in lang] == [r["answer"] for r in en]
    assert not set(lang[0]["prompt"].split()) & set(en[0]["prompt"].split())


def test_loadable_with_plain_transformers(small_zoo: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_zoo / "math")
    assert tok.eos_token is not None and tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    batch = tok(["what is one plus two? the answer is 3.", "two"], return_tensors="pt", padding=True)
    outputs = {}
    for name in ("math", "math_mistral"):
        model = AutoModelForCausalLM.from_pretrained(small_zoo / name)
        assert model.config.model_type == ("mistral" if "mistral" in name else "llama")
        with torch.no_grad():
            outputs[name] = model(**batch).logits
        assert torch.isfinite(outputs[name]).all()
    # the Mistral twin computes exactly what the Llama does
    torch.testing.assert_close(outputs["math"], outputs["math_mistral"])


def test_zoo_ref_resolves(small_zoo: Path, monkeypatch) -> None:
    from evomerge_opt.io.sources import resolve_model_ref

    monkeypatch.setenv("EVOMERGE_ZOO", str(small_zoo))
    assert Path(resolve_model_ref("zoo:lang")) == small_zoo / "lang"
    assert Path(resolve_model_ref("zoo:data/math_lang/dev.jsonl")).is_file()


def test_finetunes_differ_from_base(small_zoo: Path) -> None:
    from safetensors.torch import load_file

    base, math, lang = (load_file(small_zoo / n / "model.safetensors") for n in ("base", "math", "lang"))
    assert set(base) == set(math) == set(lang)
    # small preset: math fine-tunes the upper decoder layer (+ final norm), lang the embeddings + layer 0
    changed_math = {k for k in base if not torch.equal(base[k], math[k])}
    changed_lang = {k for k in base if not torch.equal(base[k], lang[k])}
    assert changed_math and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed_math)
    assert "model.embed_tokens.weight" in changed_lang
    assert all(k.startswith("model.layers.0.") or k == "model.embed_tokens.weight" for k in changed_lang)


def test_cached_second_call_trains_nothing(small_zoo: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("training was called for a cached zoo")

    monkeypatch.setattr(zoo_build, "train_lm", boom)
    monkeypatch.setattr(zoo_build, "_build_into", boom)
    assert build_zoo(preset("small"), root=small_zoo, progress=False) == small_zoo.resolve()
    # other settings are not the cached ones: a rebuild is attempted
    with pytest.raises(AssertionError, match="training was called"):
        build_zoo(preset("small").model_copy(update={"seed": 1}), root=small_zoo, progress=False)
    assert read_manifest(small_zoo)["settings_hash"] == preset("small").settings_hash()  # left intact


def test_deterministic_same_settings_same_weights(small_zoo: Path, tmp_path: Path) -> None:
    # Built again in a fresh process (other hash seeds, other thread pools): byte-identical files.
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "evomerge_opt.cli.main", "zoo", "build", "--preset", "small",
               "--root", str(tmp_path / "again")]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
    digests = _digests(tmp_path / "again")
    assert any(name.endswith("model.safetensors") for name in digests)
    assert digests == _digests(small_zoo)


def test_refuses_foreign_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("not a zoo")
    with pytest.raises(ConfigError, match="not empty"):
        build_zoo(preset("small"), root=tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "not a zoo"


def test_cipher_roundtrip_and_unknown_words() -> None:
    cipher = WordCipher.build(["what", "is", "seven", "plus", "five", "the", "answer"], seed=0)
    text = "what is seven plus five? the answer is 12, quickly."
    out = cipher.encipher(text)
    assert out != text and "12" in out and "?" in out
    assert cipher.decipher(out) == text
    assert len(set(cipher.forward.values())) == len(cipher.forward)
    assert WordCipher.build(["seven", "five"], seed=0).forward["seven"] == cipher.forward["seven"]


def test_corpus_is_english_from_stdlib() -> None:
    first = [text for _, (_, text) in zip(range(50), iter_docstrings(), strict=False)]
    again = [text for _, (_, text) in zip(range(50), iter_docstrings(), strict=False)]
    assert first == again and len(first) == 50
    assert all(t == normalize(t) and len(t.split()) >= 8 for t in first)
    assert normalize("Return the  VALUE (x).") == "return the value (x)."


def test_settings_hash_and_presets() -> None:
    assert ZooSettings().settings_hash() == preset("default").settings_hash()
    assert preset("small").settings_hash() != preset("default").settings_hash()
    with pytest.raises(ConfigError, match="Unknown zoo preset"):
        preset("huge")


def test_cli_build_and_info(small_zoo: Path, capsys) -> None:
    from evomerge_opt.cli.main import main

    assert main(["zoo", "build", "--preset", "small", "--root", str(small_zoo)]) == 0
    assert main(["zoo", "info", "--root", str(small_zoo)]) == 0
    out = capsys.readouterr().out
    assert "math_lang" in out and preset("small").settings_hash() in out
