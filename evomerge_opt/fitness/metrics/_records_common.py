"""Pieces the record-based metrics share: prompt checks, the chat-template rule, normalisation settings."""

from __future__ import annotations

from typing import Any

from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.extract import TEXT_NORMALIZERS


def text_normalize_steps(spec: Any) -> list[str]:
    value = spec.normalize
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def text_normalize_problems(spec: Any) -> list[str]:
    steps = text_normalize_steps(spec)
    bad = [s for s in steps if s not in TEXT_NORMALIZERS]
    if bad:
        return [(f"`normalize` for metric {spec.metric} takes {list(TEXT_NORMALIZERS)} (one or a list), "
                 f"but got {spec.normalize!r}.")]
    return []


def require_chat_template(spec: Any, tokenizer: Any) -> None:
    if spec.chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"Dataset {spec.name!r} sets `chat: true`, but the tokenizer has no chat template; set `chat: false` "
            "or use a tokenizer that has one."
        )


def as_text(value: Any) -> str:
    """A record's answer as text (numbers in JSON become their decimal form)."""
    return value if isinstance(value, str) else str(value)


def text_field_problems(spec: Any, records: list[dict[str, Any]], fields: dict[str, str]) -> list[str]:
    """Fields present (not null) and holding text or numbers."""
    from evomerge_opt.fitness.records import listed, missing_field_problems

    problems = missing_field_problems(spec, records, fields)
    if problems:
        return problems
    for key, field in fields.items():
        bad = [i for i, r in enumerate(records) if not isinstance(r[field], (str, int, float)) or isinstance(r[field], bool)]
        if bad:
            problems.append(
                f"dataset {spec.name!r}: field {field!r} (`{key}`) must hold text, but records {listed(bad)} hold "
                f"{type(records[bad[0]][field]).__name__}."
            )
    return problems
