"""Records of a dataset as text documents: file formats, text fields, chat rendering.

Files: ``.txt`` holds one document per non-empty line (``text_split: line``, default) or documents
separated by blank lines (``text_split: paragraph``) or one document per file (``document``);
``.json``/``.jsonl``, ``.parquet`` and ``.csv`` hold records whose text is in ``text_field`` (found
automatically: ``text``, ``content``, ...; pairs like ``question``/``answer`` are joined by a newline),
or chat records with a ``messages`` list rendered with the tokenizer's chat template.

A dataset that cannot be loaded or has no text field is an error
(:class:`~evomerge_opt.errors.ModelSourceError` / :class:`~evomerge_opt.errors.ConfigError`); there is
never a fallback to dummy data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evomerge_opt.data.spec import DataSpec
from evomerge_opt.errors import ConfigError, ModelSourceError
from evomerge_opt.paths import cache_dir as default_cache_dir

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


def resolve_path(spec: DataSpec) -> Path:
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


def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    for suffix in reversed(suffixes):
        if suffix in SUFFIX_FORMATS:
            return SUFFIX_FORMATS[suffix]
    raise ModelSourceError(
        f"Cannot tell the format of dataset file {str(path)!r} from its suffix {path.suffix!r}; use one of "
        f"{', '.join(sorted(SUFFIX_FORMATS))}."
    )


def load_records(spec: DataSpec, path: Path | None):
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
    fmt = file_format(path)
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


def render_chat(messages: Any, tokenizer: Any, spec: DataSpec, index: int) -> str:
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


def texts_of(ds, spec: DataSpec, tokenizer: Any) -> tuple[list[str], bool]:
    """Documents of ``ds`` as strings; the flag says they were rendered by a chat template."""
    columns = list(ds.column_names)
    if spec.text_field is not None:
        if spec.text_field not in columns:
            raise ModelSourceError(
                f"Dataset {spec.name!r} has no field {spec.text_field!r}; its fields are {columns}."
            )
        field = spec.text_field
        if field == "messages":
            return [render_chat(m, tokenizer, spec, i) for i, m in enumerate(ds[field])], True
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
        return [render_chat(m, tokenizer, spec, i) for i, m in enumerate(ds["messages"])], True
    for first, second in TEXT_FIELD_PAIRS:
        if first in columns and second in columns:
            return [f"{a}\n{b}" for a, b in zip(ds[first], ds[second]) if a or b], False
    raise ModelSourceError(
        f"Dataset {spec.name!r} has no text field: looked for {list(TEXT_FIELD_CANDIDATES)}, `messages`, and "
        f"pairs {[f'{a}+{b}' for a, b in TEXT_FIELD_PAIRS]}, but its fields are {columns}; name one with "
        "`text_field`."
    )
