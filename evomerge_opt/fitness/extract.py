"""Answer extraction and comparison for generated text (pure Python, no torch).

* ``extract``: ``last_number`` (the last number in the text: optional sign not glued to a word,
  thousands separators ``1,234``, decimals), ``first_line`` (the first non-empty line, stripped), or
  ``regex:<pattern>`` (group 1 of the pattern's first match; the pattern must have exactly one group).
  Nothing found -> ``None`` (the answer counts as not extracted, and wrong).
* ``compare``: ``exact`` (string equality after ``normalize``) or ``numeric`` (both sides parsed as
  numbers: ``$``, thousands commas and a trailing period dropped; equal within 1e-9 relative/absolute).
* ``normalize``: ``strip`` (surrounding whitespace) and/or ``casefold``; applied to both sides of an
  ``exact`` comparison.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

EXTRACTORS = ("last_number", "first_line", "regex:<pattern>")
TEXT_NORMALIZERS = ("strip", "casefold")

# A sign counts only when it does not follow a word character ("5-3" is 5 and 3, " -3" is -3).
_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")

Extractor = Callable[[str], "str | None"]


def extractor_problem(value: str) -> str | None:
    """Why ``value`` is not a valid ``extract`` setting (None when it is)."""
    if value in ("last_number", "first_line"):
        return None
    if value.startswith("regex:"):
        pattern = value[len("regex:"):]
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            return f"`extract: regex:...` needs a valid regular expression, but {pattern!r} is not: {exc}."
        if compiled.groups != 1:
            return (
                f"`extract: regex:<pattern>` must have exactly one capturing group (the answer), but {pattern!r} has "
                f"{compiled.groups}; use (?:...) for the other groups."
            )
        return None
    return f"`extract` must be one of {', '.join(EXTRACTORS)}, but got {value!r}."


def make_extractor(value: str) -> Extractor:
    problem = extractor_problem(value)
    if problem is not None:
        raise ValueError(problem)
    if value == "last_number":
        return last_number
    if value == "first_line":
        return first_line
    compiled = re.compile(value[len("regex:"):])

    def regex(text: str) -> str | None:
        match = compiled.search(text)
        if match is None or match.group(1) is None:
            return None
        return match.group(1)

    return regex


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def first_line(text: str) -> str | None:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def normalize_text(text: str, steps: Sequence[str]) -> str:
    if "strip" in steps:
        text = text.strip()
    if "casefold" in steps:
        text = text.casefold()
    return text


def to_number(text: str) -> float | None:
    """``text`` as a number (``$``, thousands commas, surrounding space and a trailing period dropped)."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(predicted: str | None, reference: str, compare: str, normalize: Sequence[str]) -> bool:
    if predicted is None:
        return False
    if compare == "numeric":
        got, want = to_number(predicted), to_number(reference)
        return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    return normalize_text(predicted, normalize) == normalize_text(reference, normalize)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (lm-eval's ``until``)."""
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]
