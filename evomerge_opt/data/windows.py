"""Token windows: a :class:`~evomerge_opt.data.spec.DataSpec` becomes fixed token rows, cached on disk.

Layout of the windows (``packing``):

* ``packing: false`` (default): one row per document, truncated at ``seq_len`` and right-padded to the
  longest row. Every document is scored from its own start, which is what perplexity on short records
  (QA lines, chat turns) needs. The tokenizer adds its usual special tokens (e.g. a BOS) to each
  document; ``add_eos: true`` appends EOS so the end of the document is scored too.
* ``packing: true``: documents are tokenised, each followed by EOS, concatenated and cut into
  windows of exactly ``seq_len`` tokens (the last, shorter one padded). No padding is wasted, but a
  window may start mid-document.

The documents come from :mod:`evomerge_opt.data.records`. A dataset that yields no tokens is an error.

Cache: ``<cache_dir("windows")>/<sha256>.safetensors`` where the key hashes the data file's bytes (or
the hub dataset's fingerprint), the tokenizer's content (vocabulary, merges, special tokens, chat
template) and every setting that changes the windows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.data import records
from evomerge_opt.data.spec import DataSpec
from evomerge_opt.errors import ConfigError, ModelSourceError
from evomerge_opt.io.hashing import file_sha256
from evomerge_opt.paths import cache_dir as default_cache_dir

logger = logging.getLogger(__name__)

WINDOWS_FORMAT_VERSION = 1


@dataclass
class TokenWindows:
    """Tokenised rows: ``input_ids`` and ``attention_mask`` are ``[n, L]`` (right-padded, 1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    name: str = ""

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.attention_mask.shape or self.input_ids.dim() != 2:
            raise ValueError(
                "`input_ids` and `attention_mask` must both be [n, L], but got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}."
            )

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(dim=1)

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    @property
    def num_predicted(self) -> int:
        """Tokens that get a prediction (every real token but the first of each row)."""
        return int((self.attention_mask[:, 1:] & self.attention_mask[:, :-1]).sum())

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        digest.update(str(tuple(self.input_ids.shape)).encode())
        digest.update(self.input_ids.to(torch.int64).contiguous().numpy().tobytes())
        digest.update(self.attention_mask.to(torch.int8).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def select(self, count: int) -> TokenWindows:
        """The first ``count`` rows, trimmed to their longest row."""
        ids, mask = self.input_ids[:count], self.attention_mask[:count]
        width = int(mask.sum(dim=1).max()) if len(ids) else 0
        return TokenWindows(ids[:, :width].clone(), mask[:, :width].clone(), self.name)

    @staticmethod
    def concat(windows: list[TokenWindows], name: str = "") -> TokenWindows:
        """Rows of several window sets in one (padded to the widest)."""
        width = max(int(w.input_ids.shape[1]) for w in windows)
        ids = [torch.nn.functional.pad(w.input_ids, (0, width - w.input_ids.shape[1])) for w in windows]
        mask = [torch.nn.functional.pad(w.attention_mask, (0, width - w.attention_mask.shape[1])) for w in windows]
        return TokenWindows(torch.cat(ids), torch.cat(mask), name)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides a tokenizer's output: its model/vocab, special tokens and chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())}
    digest.update(json.dumps(special, sort_keys=True).encode())
    for attr in ("chat_template", "padding_side", "add_bos_token", "add_eos_token", "model_max_length"):
        digest.update(f"{attr}={getattr(tokenizer, attr, None)!r}".encode())
    return digest.hexdigest()


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _tokenize(texts: list[str], tokenizer: Any, spec: DataSpec, chat: bool) -> list[list[int]]:
    # A chat template already writes the special tokens (BOS, turn markers); plain text gets the
    # tokenizer's usual ones.
    encoded = tokenizer(texts, add_special_tokens=not chat, truncation=False)["input_ids"]
    if spec.add_eos or spec.packing:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ConfigError(
                f"Dataset {spec.name!r} needs an EOS token (packing or add_eos), but the tokenizer has none; set "
                "`packing: false` and `add_eos: false`, or use a tokenizer with an EOS token."
            )
        encoded = [ids + [int(eos)] if not ids or ids[-1] != eos else ids for ids in encoded]
    return encoded


def _rows(encoded: list[list[int]], spec: DataSpec) -> list[list[int]]:
    """Rows of at most ``seq_len`` tokens, honouring ``num_samples`` / ``max_tokens``."""
    rows: list[list[int]] = []
    if spec.packing:
        stream = [token for ids in encoded for token in ids]
        rows = [stream[i : i + spec.seq_len] for i in range(0, len(stream), spec.seq_len)]
    else:
        rows = [ids[: spec.seq_len] for ids in encoded]
    rows = [row for row in rows if len(row) >= 2]  # a single token has nothing to predict
    if spec.num_samples is not None:
        rows = rows[: spec.num_samples]
    if spec.max_tokens is not None:
        kept, total = [], 0
        for row in rows:
            if total >= spec.max_tokens:
                break
            row = row[: spec.max_tokens - total]
            if len(row) >= 2:
                kept.append(row)
            total += len(row)
        rows = kept
    return rows


def _settings_key(spec: DataSpec) -> dict[str, Any]:
    return {
        "version": WINDOWS_FORMAT_VERSION,
        "text_field": spec.text_field,
        "seq_len": spec.seq_len,
        "max_tokens": spec.max_tokens,
        "num_samples": spec.num_samples,
        "packing": spec.packing,
        "add_eos": spec.add_eos,
        "text_split": spec.text_split,
        "shuffle": spec.shuffle,
        "seed": spec.seed,
    }


def load_windows(
    spec: DataSpec | dict[str, Any] | str | os.PathLike[str],
    tokenizer: Any,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> TokenWindows:
    """Tokenise ``spec`` into windows (see the module docstring), reading/writing the windows cache."""
    import safetensors.torch as st

    from evomerge_opt.io.atomic import atomic_write_bytes

    spec = DataSpec.parse(spec)
    ds = None
    path: Path | None = None
    if spec.hub is not None:
        ds, source_key = records.load_records(spec, None)
    else:
        # A local file is keyed by its bytes, so a cache hit never parses the file.
        path = records.resolve_path(spec)
        if path.stat().st_size == 0:
            raise ModelSourceError(f"Dataset file {str(path)!r} (dataset {spec.name!r}) is empty.")
        source_key = f"file:{records.file_format(path)}:{file_sha256(path)}"
    key_material = json.dumps(
        {"source": source_key, "tokenizer": tokenizer_fingerprint(tokenizer), "settings": _settings_key(spec)},
        sort_keys=True,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir("windows")
    cache_file = directory / f"{key}.safetensors"
    if use_cache and cache_file.is_file():
        tensors = st.load_file(str(cache_file))
        logger.debug("windows of %s from cache %s", spec.name, cache_file)
        return TokenWindows(tensors["input_ids"], tensors["attention_mask"].to(torch.bool), spec.name or "")

    if ds is None:
        ds, _ = records.load_records(spec, path)
    if len(ds) == 0:
        raise ModelSourceError(f"Dataset {spec.name!r} has no records.")
    if spec.shuffle:
        ds = ds.shuffle(seed=spec.seed)
    texts, chat = records.texts_of(ds, spec, tokenizer)
    if not texts:
        raise ModelSourceError(f"Dataset {spec.name!r} has no non-empty text.")
    rows = _rows(_tokenize(texts, tokenizer, spec, chat), spec)
    if not rows:
        raise ModelSourceError(
            f"Dataset {spec.name!r} gives no window with at least 2 tokens (seq_len={spec.seq_len}); "
            "its documents are too short or the limits too small."
        )
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = True
    windows = TokenWindows(input_ids, mask, spec.name or "")
    if use_cache:
        payload = st.save({"input_ids": input_ids, "attention_mask": mask.to(torch.uint8)},
                          metadata={"name": spec.name or "", "key": key_material[:4000]})
        atomic_write_bytes(cache_file, payload)
    logger.info("dataset %s: %d rows, %d tokens", spec.name, windows.num_rows, windows.num_tokens)
    return windows
