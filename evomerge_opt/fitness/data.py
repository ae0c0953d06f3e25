"""Evaluation and calibration data: a :class:`DataSpec` becomes fixed token windows, cached on disk.

Layout of the windows (``packing``):

* ``packing: false`` (default): one row per document, truncated at ``seq_len`` and right-padded to the
  longest row. Every document is scored from its own start, which is what perplexity on short records
  (QA lines, chat turns) needs. The tokenizer adds its usual special tokens (e.g. a BOS) to each
  document; ``add_eos: true`` appends EOS so the end of the document is scored too.
* ``packing: true``: documents are tokenised, each followed by EOS, concatenated and cut into
  windows of exactly ``seq_len`` tokens (the last, shorter one padded). No padding is wasted, but a
  window may start mid-document.

Files: ``.txt`` holds one document per non-empty line (``text_split: line``, default) or documents
separated by blank lines (``text_split: paragraph``) or one document per file (``document``);
``.json``/``.jsonl``, ``.parquet`` and ``.csv`` hold records whose text is in ``text_field`` (found
automatically: ``text``, ``content``, ...; pairs like ``question``/``answer`` are joined by a newline),
or chat records with a ``messages`` list rendered with the tokenizer's chat template.

A dataset that cannot be loaded, has no text field or yields no tokens is an error
(:class:`~evomerge_opt.errors.ModelSourceError` / :class:`~evomerge_opt.errors.ConfigError`); there is
never a fallback to dummy data.

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
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge_opt.errors import ConfigError, ModelSourceError, validation_problems
from evomerge_opt.paths import cache_dir as default_cache_dir

logger = logging.getLogger(__name__)

WINDOWS_FORMAT_VERSION = 1

# Single fields searched in this order when `text_field` is not given.
TEXT_FIELD_CANDIDATES = ("text", "content", "document", "sentence", "body", "passage", "story")
# Field pairs joined by "\n" when no single text field exists.
TEXT_FIELD_PAIRS = (
    ("question", "answer"),
    ("prompt", "completion"),
    ("prompt", "response"),
    ("instruction", "response"),
    ("instruction", "output"),
    ("input", "output"),
)
SUFFIX_FORMATS = {
    ".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
    ".csv": "csv",
}


class HubDataset(BaseModel):
    """A dataset on the Hugging Face hub (needs network unless it is already in the local cache)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None


class DataSpec(BaseModel):
    """One evaluation or calibration dataset. See the module docstring for the window layout."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    path: str | None = None
    hub: HubDataset | None = None
    text_field: str | None = None
    seq_len: int = Field(256, ge=2)
    max_tokens: int | None = Field(None, ge=2)
    num_samples: int | None = Field(None, ge=1)
    weight: float = Field(1.0, gt=0)
    packing: bool = False
    add_eos: bool = False
    text_split: Literal["line", "paragraph", "document"] = "line"
    shuffle: bool = False
    seed: int = 0

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("`path` must not be empty; give a data file or `zoo:data/...`.")
        return value

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if (self.path is None) == (self.hub is None):
            raise ValueError(
                "exactly one of `path` (a local file or zoo:...) and `hub` ({name, config, split}) must be "
                f"given, but got path={self.path!r}, hub={self.hub!r}."
            )
        if self.max_tokens is not None and self.num_samples is not None:
            raise ValueError(
                f"`max_tokens` and `num_samples` are mutually exclusive, but got max_tokens={self.max_tokens}, "
                f"num_samples={self.num_samples}; keep one."
            )
        if self.name is None:
            self.name = _derive_name(self)
        return self

    @classmethod
    def parse(cls, value: DataSpec | dict[str, Any] | str | os.PathLike[str], **overrides: Any) -> DataSpec:
        """A spec from a spec, a mapping or a bare path (``overrides`` fill settings not given)."""
        if isinstance(value, DataSpec):
            if not overrides:
                return value
            value = value.model_dump(exclude_unset=True)  # only what was given, so defaults can fill the rest
        if not isinstance(value, (str, os.PathLike, dict)):
            raise ConfigError(
                f"A dataset is a path or a mapping like {{path: data.jsonl}}, but got {type(value).__name__}: {value!r}."
            )
        data: dict[str, Any] = {"path": os.fspath(value)} if isinstance(value, (str, os.PathLike)) else dict(value)
        for key, val in overrides.items():
            if val is None or key in data:
                continue
            # A limit given in the spec itself wins over a default limit of the other kind.
            if key in ("num_samples", "max_tokens") and ({"num_samples", "max_tokens"} & data.keys()):
                continue
            data[key] = val
        try:
            return cls(**data)
        except ValidationError as exc:
            problems = validation_problems(exc, cls.model_fields, top="data")
            raise ConfigError(f"invalid dataset spec {value!r}", problems) from None


def _derive_name(spec: DataSpec) -> str:
    if spec.hub is not None:
        parts = [spec.hub.name] + ([spec.hub.config] if spec.hub.config else []) + [spec.hub.split]
        return ":".join(parts)
    text = (spec.path or "data").removeprefix("zoo:")
    path = Path(text)
    stem = path.name.split(".")[0] or path.name
    # zoo:data/math/test.jsonl -> "math/test"; ./eval.txt -> "eval"
    if stem in _SPLIT_NAMES and path.parent.name not in ("", "."):
        return f"{path.parent.name}/{stem}"
    return stem


_SPLIT_NAMES = {"train", "test", "dev", "valid", "validation", "eval", "calib", "calibration", "data"}


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


# ----------------------------------------------------------------------------------------- hashing


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


# ----------------------------------------------------------------------------------------- loading


def _resolve_path(spec: DataSpec) -> Path:
    from evomerge_opt.io.sources import resolve_model_ref

    assert spec.path is not None  # guaranteed by DataSpec's validator
    text = spec.path
    if text.startswith("zoo:"):
        return Path(resolve_model_ref(text))
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"Dataset file {text!r} (dataset {spec.name!r}) does not exist; check the path, or use "
            "`hub: {name: ..., split: ...}` for a hub dataset."
        )
    if path.is_dir():
        raise ModelSourceError(f"Dataset path {text!r} is a directory; give one .txt/.json/.jsonl/.parquet/.csv file.")
    return path.resolve()


def _file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    for suffix in reversed(suffixes):
        if suffix in SUFFIX_FORMATS:
            return SUFFIX_FORMATS[suffix]
    raise ModelSourceError(
        f"Cannot tell the format of dataset file {str(path)!r} from its suffix {path.suffix!r}; use one of "
        f"{', '.join(sorted(SUFFIX_FORMATS))}."
    )


def _load_dataset(spec: DataSpec, path: Path | None):
    """The records of ``spec`` as a ``datasets.Dataset`` and, for a hub dataset, its fingerprint."""
    import datasets

    datasets.disable_progress_bars()
    if spec.hub is not None:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ModelSourceError(
                f"Hub dataset {spec.hub.name!r} cannot be fetched: HF_HUB_OFFLINE=1 is set. Unset it when "
                "online, or download the data and pass it as a local file (`path:`)."
            )
        try:
            ds = datasets.load_dataset(
                spec.hub.name, spec.hub.config, split=spec.hub.split, revision=spec.hub.revision
            )
        except Exception as exc:  # datasets raises many types (network, missing config, ...)
            raise ModelSourceError(
                f"Could not load hub dataset {spec.hub.name!r} (config={spec.hub.config!r}, "
                f"split={spec.hub.split!r}): {type(exc).__name__}: {exc}"
            ) from exc
        return ds, f"hub:{spec.hub.name}:{spec.hub.config}:{spec.hub.split}:{ds._fingerprint}"

    assert path is not None
    fmt = _file_format(path)
    kwargs: dict[str, Any] = {"sample_by": spec.text_split} if fmt == "text" else {}
    try:
        # Arrow files of local data go to evo-merge's cache, not the user's HF datasets cache.
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train",
                                   cache_dir=str(default_cache_dir("datasets")), **kwargs)
    except Exception as exc:  # malformed JSON/CSV/parquet surfaces as DatasetGenerationError, ArrowInvalid...
        cause = exc.__cause__ or exc
        raise ModelSourceError(
            f"Could not read dataset file {str(path)!r} as {fmt} (dataset {spec.name!r}): "
            f"{type(cause).__name__}: {cause}"
        ) from exc
    return ds, None


def _render_chat(messages: Any, tokenizer: Any, spec: DataSpec, index: int) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"Dataset {spec.name!r} holds chat records (`messages`), but the tokenizer has no chat template; "
            "use a tokenizer with one, or name a plain text column with `text_field`."
        )
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ModelSourceError(
            f"Record {index} of dataset {spec.name!r}: `messages` must be a list of {{role, content}} mappings, "
            f"but got {str(messages)[:120]!r}."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _texts(ds, spec: DataSpec, tokenizer: Any) -> tuple[list[str], bool]:
    """Documents of ``ds`` as strings; the flag says they were rendered by a chat template."""
    columns = list(ds.column_names)
    if spec.text_field is not None:
        if spec.text_field not in columns:
            raise ModelSourceError(
                f"Dataset {spec.name!r} has no field {spec.text_field!r}; its fields are {columns}."
            )
        field = spec.text_field
        if field == "messages":
            return [_render_chat(m, tokenizer, spec, i) for i, m in enumerate(ds[field])], True
        values = ds[field]
        bad = [i for i, v in enumerate(values) if v is not None and not isinstance(v, str)]
        if bad:
            raise ModelSourceError(
                f"Field {field!r} of dataset {spec.name!r} must hold text, but record {bad[0]} holds "
                f"{type(values[bad[0]]).__name__}; name a text field with `text_field`."
            )
        return [v for v in values if v], False
    for field in TEXT_FIELD_CANDIDATES:
        if field in columns:
            values = ds[field]
            if values and all(v is None or isinstance(v, str) for v in values):
                return [v for v in values if v], False
    if "messages" in columns:
        return [_render_chat(m, tokenizer, spec, i) for i, m in enumerate(ds["messages"])], True
    for first, second in TEXT_FIELD_PAIRS:
        if first in columns and second in columns:
            return [f"{a}\n{b}" for a, b in zip(ds[first], ds[second]) if a or b], False
    raise ModelSourceError(
        f"Dataset {spec.name!r} has no text field: looked for {list(TEXT_FIELD_CANDIDATES)}, `messages`, and "
        f"pairs {[f'{a}+{b}' for a, b in TEXT_FIELD_PAIRS]}, but its fields are {columns}; name one with "
        "`text_field`."
    )


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
        ds, source_key = _load_dataset(spec, None)
    else:
        # A local file is keyed by its bytes, so a cache hit never parses the file.
        path = _resolve_path(spec)
        if path.stat().st_size == 0:
            raise ModelSourceError(f"Dataset file {str(path)!r} (dataset {spec.name!r}) is empty.")
        source_key = f"file:{_file_format(path)}:{file_sha256(path)}"
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
        ds, _ = _load_dataset(spec, path)
    if len(ds) == 0:
        raise ModelSourceError(f"Dataset {spec.name!r} has no records.")
    if spec.shuffle:
        ds = ds.shuffle(seed=spec.seed)
    texts, chat = _texts(ds, spec, tokenizer)
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


def parse_data_arg(text: str, **defaults: Any) -> DataSpec:
    """A ``--data`` CLI argument: ``PATH``, ``NAME=PATH`` and/or ``PATH@WEIGHT`` (PATH may be ``zoo:...``)."""
    name = None
    weight = None
    head, sep, rest = text.partition("=")
    if sep and head and "/" not in head and ":" not in head:
        name, text = head, rest
    if "@" in text:
        text, _, weight_text = text.rpartition("@")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(f"`--data PATH@WEIGHT` needs a number after '@', but got {weight_text!r}.") from None
    data: dict[str, Any] = {"path": text}
    if name:
        data["name"] = name
    if weight is not None:
        data["weight"] = weight
    return DataSpec.parse(data, **defaults)
