"""Dataset specs: :class:`DataSpec` (one evaluation or calibration dataset) and ``--data`` parsing.

A spec names a local file (``path``, also ``zoo:data/...``) or a hub dataset (``hub``) and the
settings that shape its token windows (:mod:`evomerge_opt.data.windows` documents the layout). Only
pydantic is imported here: search-space validation parses specs before torch loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge_opt.errors import ConfigError, validation_problems


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
