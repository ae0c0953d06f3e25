"""Model config YAML: architecture and sizes of a Llama or Mistral model, turned into a HF config.

The same small form is used by the pico zoo, the test fixtures, the benchmarks and
``evo-merge model construct``::

    architecture: llama            # llama | mistral
    vocab_size: 2048
    hidden_size: 160
    intermediate_size: 448
    num_hidden_layers: 4
    num_attention_heads: 4
    num_key_value_heads: 4         # < num_attention_heads gives grouped-query attention
    max_position_embeddings: 512
    rms_norm_eps: 1.0e-5
    tie_word_embeddings: true
    sliding_window: null           # mistral only
    dtype: float32
    tokenizer: null                # optional: tokenizer dir saved beside the model
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge_opt.config.dtypes import DTYPE_ALIASES
from evomerge_opt.errors import ConfigError, validation_problems

DTYPES: dict[str, torch.dtype] = {alias: getattr(torch, name) for alias, name in DTYPE_ALIASES.items()}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None``/"auto" -> ``None``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    if key == "auto":
        return None
    if key not in DTYPES:
        raise ConfigError(f"Unknown dtype {value!r}; valid dtypes are: {', '.join(sorted(set(DTYPES)))} (or 'auto').")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ModelConfigSpec(BaseModel):
    """Sizes of a decoder-only Llama/Mistral model (see module docstring)."""

    model_config = ConfigDict(extra="forbid")

    architecture: Literal["llama", "mistral"] = "llama"
    vocab_size: int = Field(2048, gt=0)
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = False
    sliding_window: int | None = Field(None, gt=0)
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Optional tokenizer (a HF tokenizer dir, model dir or zoo:NAME) saved beside the model by
    # `evo-merge model construct`; not part of the HF config.
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfigSpec:
        heads, kv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
        if self.head_dim is None and self.hidden_size % heads:
            raise ValueError(
                f"`hidden_size % num_attention_heads == 0` must hold, but got ({self.hidden_size=}, {heads=}); "
                "change one of them or set head_dim."
            )
        if heads % kv:
            raise ValueError(f"`num_attention_heads % num_key_value_heads == 0` must hold, but got ({heads=}, {kv=}).")
        if self.sliding_window is not None and self.architecture != "mistral":
            raise ValueError(f"sliding_window is a Mistral option, but architecture is {self.architecture!r}.")
        parse_dtype(self.dtype)
        return self

    def to_hf_config(self) -> Any:
        """The ``LlamaConfig`` / ``MistralConfig`` these sizes describe."""
        from transformers import LlamaConfig, MistralConfig

        kwargs: dict[str, Any] = self.model_dump(
            exclude={"architecture", "dtype", "sliding_window", "rope_theta", "tokenizer"}
        )
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs["num_key_value_heads"] = self.num_key_value_heads or self.num_attention_heads
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.architecture == "mistral":
            config = MistralConfig(sliding_window=self.sliding_window, **kwargs)
        else:
            config = LlamaConfig(**kwargs)
        config.dtype = parse_dtype(self.dtype)
        return config

    @classmethod
    def from_yaml_dict(cls, data: dict[str, Any], source: str = "<model config>") -> ModelConfigSpec:
        from pydantic import ValidationError

        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = validation_problems(exc, cls.model_fields)
            raise ConfigError(f"{source} is not a valid model config:", problems) from None
