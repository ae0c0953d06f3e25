"""Evaluation data: formats, text-field detection, chat records, limits, windows cache, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evomerge_opt.data import records as records_mod
from evomerge_opt.data import windows as windows_mod
from evomerge_opt.data.spec import DataSpec, parse_data_arg
from evomerge_opt.data.windows import load_windows
from evomerge_opt.errors import ConfigError, ModelSourceError

DOCS = ["the quick brown fox", "what is two plus three? the answer is five.", "the lazy dog"]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _rows(windows) -> list[list[int]]:
    return [ids[mask].tolist() for ids, mask in zip(windows.input_ids, windows.attention_mask)]


def _expected(tok, docs):
    return [tok(d)["input_ids"] for d in docs]


def test_jsonl_one_row_per_document_right_padded(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path / "wiki.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    windows = load_windows(DataSpec(path=str(path)), tiny_tokenizer, cache_dir=tmp_path / "c")
    assert _rows(windows) == _expected(tiny_tokenizer, DOCS)
    assert windows.input_ids.shape == (3, max(len(r) for r in _expected(tiny_tokenizer, DOCS)))
    # right padding: every row's mask is 1...1 0...0
    for mask in windows.attention_mask:
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
    assert windows.name == "wiki"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_csv_parquet_json_and_content_field(tmp_path, tiny_tokenizer, fmt):
    import pandas as pd

    frame = pd.DataFrame({"content": DOCS, "label": [0, 1, 2]})
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    windows = load_windows({"path": str(path)}, tiny_tokenizer, cache_dir=tmp_path / "c")
    assert _rows(windows) == _expected(tiny_tokenizer, DOCS)


def test_txt_lines_and_paragraphs(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("the quick brown fox\nthe lazy dog\n\nwhat is two plus three?\n")
    lines = load_windows({"path": str(path)}, tiny_tokenizer, cache_dir=tmp_path / "c")
    assert _rows(lines) == _expected(tiny_tokenizer, ["the quick brown fox", "the lazy dog", "what is two plus three?"])
    paragraphs = load_windows({"path": str(path), "text_split": "paragraph"}, tiny_tokenizer, cache_dir=tmp_path / "c")
    assert paragraphs.num_rows == 2
    assert _rows(paragraphs)[1] == _expected(tiny_tokenizer, ["what is two plus three?"])[0]


def test_named_field_and_pairs(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "what is two plus three?", "answer": "five"}])
    windows = load_windows({"path": str(path)}, tiny_tokenizer, cache_dir=tmp_path / "c")
    assert _rows(windows) == _expected(tiny_tokenizer, ["what is two plus three?\nfive"])
    named = load_windows({"path": str(path), "text_field": "answer", "name": "ans"}, tiny_tokenizer,
                         cache_dir=tmp_path / "c")
    assert _rows(named) == _expected(tiny_tokenizer, ["five"]) and named.name == "ans"


def test_limits_and_packing(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    full = _expected(tiny_tokenizer, DOCS)
    two = load_windows({"path": str(path), "num_samples": 2}, tiny_tokenizer, cache_dir=tmp_path / "c")
    assert _rows(two) == full[:2]
    short = load_windows({"path": str(path), "seq_len": 3}, tiny_tokenizer, cache_dir=tmp_path / "c")
    assert _rows(short) == [r[:3] for r in full]
    budget = len(full[0]) + 2
    capped = load_windows({"path": str(path), "max_tokens": budget}, tiny_tokenizer, cache_dir=tmp_path / "c")
    assert _rows(capped) == [full[0], full[1][:2]] and capped.num_tokens == budget
    packed = load_windows({"path": str(path), "packing": True, "seq_len": 8}, tiny_tokenizer, cache_dir=tmp_path / "c")
    eos = tiny_tokenizer.eos_token_id
    stream = [t for r in full for t in r + [eos]]
    assert _rows(packed) == [stream[i:i + 8] for i in range(0, len(stream), 8) if len(stream[i:i + 8]) >= 2]
    assert packed.input_ids.shape[1] == 8


def test_chat_records_need_a_template(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "two plus three?"},
                                                          {"role": "assistant", "content": "five"}]}])
    with pytest.raises(ConfigError, match="chat template"):
        load_windows({"path": str(path)}, tiny_tokenizer, cache_dir=tmp_path / "c")
    tok = type(tiny_tokenizer).from_pretrained  # noqa: F841  (documenting that we copy, not mutate, below)
    import copy

    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    windows = load_windows({"path": str(path)}, templated, cache_dir=tmp_path / "c")
    expected = templated("user: two plus three?\nassistant: five\n", add_special_tokens=False)["input_ids"]
    assert _rows(windows) == [expected]


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ('{"text": "ok"}\n{"text": broken\n', "Could not read"),
        ('{"title": "x", "n": 1}\n', "no text field"),
        ('{"text": ""}\n', "no non-empty text"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, tiny_tokenizer, content, match):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ModelSourceError, match=match):
        load_windows({"path": str(path)}, tiny_tokenizer, cache_dir=tmp_path / "c")


def test_more_bad_input(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}])
    with pytest.raises(ModelSourceError, match="no field 'body'"):
        load_windows({"path": str(path), "text_field": "body"}, tiny_tokenizer, cache_dir=tmp_path / "c")
    odd = tmp_path / "d.xyz"
    odd.write_text("x")
    with pytest.raises(ModelSourceError, match="format"):
        load_windows({"path": str(odd)}, tiny_tokenizer, cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        DataSpec.parse({"path": str(path), "num_samples": 2, "max_tokens": 10})
    with pytest.raises(ConfigError, match="exactly one of"):
        DataSpec.parse({"text_field": "text"})
    with pytest.raises(ConfigError, match="sequence_length: unknown key; valid keys are: .*seq_len"):
        DataSpec.parse({"path": str(path), "sequence_length": 5})
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        load_windows({"hub": {"name": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"}}, tiny_tokenizer)
    with pytest.raises(ModelSourceError, match="zoo"):
        load_windows({"path": "zoo:data/nope/test.jsonl"}, tiny_tokenizer)


def test_windows_cache_reused_and_rebuilt(tmp_path, tiny_tokenizer, monkeypatch):
    calls = []
    real = records_mod.load_records

    def counting(spec, path):
        calls.append(path)
        return real(spec, path)

    monkeypatch.setattr(records_mod, "load_records", counting)
    path = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    cache = tmp_path / "cache"
    first = load_windows({"path": str(path)}, tiny_tokenizer, cache_dir=cache)
    second = load_windows({"path": str(path)}, tiny_tokenizer, cache_dir=cache)
    assert len(calls) == 1 and len(list(cache.glob("*.safetensors"))) == 1
    assert torch.equal(first.input_ids, second.input_ids) and torch.equal(first.attention_mask, second.attention_mask)
    # Different settings -> another entry.
    load_windows({"path": str(path), "seq_len": 4}, tiny_tokenizer, cache_dir=cache)
    assert len(calls) == 2
    # Changed content -> rebuilt, and the new windows reflect it.
    _jsonl(path, [{"text": "the lazy dog"}])
    third = load_windows({"path": str(path)}, tiny_tokenizer, cache_dir=cache)
    assert len(calls) == 3 and _rows(third) == _expected(tiny_tokenizer, ["the lazy dog"])


def test_tokenizer_fingerprint_changes_with_vocab(tiny_tokenizer):
    import copy

    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["zebra"])
    assert windows_mod.tokenizer_fingerprint(other) != windows_mod.tokenizer_fingerprint(tiny_tokenizer)
    assert windows_mod.tokenizer_fingerprint(copy.deepcopy(tiny_tokenizer)) == windows_mod.tokenizer_fingerprint(tiny_tokenizer)


def test_parse_data_arg():
    spec = parse_data_arg("math=zoo:data/math/test.jsonl@2", seq_len=64)
    assert (spec.name, spec.path, spec.weight, spec.seq_len) == ("math", "zoo:data/math/test.jsonl", 2.0, 64)
    plain = parse_data_arg("/tmp/x/test.jsonl")
    assert plain.name == "x/test" and plain.weight == 1.0
    assert DataSpec.parse({"path": "a.jsonl", "max_tokens": 50}, num_samples=10).num_samples is None
