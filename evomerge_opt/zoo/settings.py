"""Settings of the pico zoo (:class:`ZooSettings`) and its presets; their hash keys the build cache.

Why the defaults are what they are (measured on math_lang dev/test, see the issue-6 report):

* a *word-level* cipher (one made-up word per English word, digits shared) plus English sentences
  about the numbers (in the base corpus; their cipher in the language fine-tune), so the language
  specialist learns what the made-up number and question words mean, not just their spelling;
* the fine-tunes touch different parts of one base: ``lang`` the embeddings + first decoder layer,
  ``math`` the upper three layers + final norm. Full fine-tunes of both (or an embeddings-only
  ``lang``) left no merge better than the ``lang`` specialist on the target;
* short fine-tunes (200 / 150 steps at 2e-3 / 3e-3): a longer, hotter ``math`` run (300 steps at 5e-3)
  drifted further from the base, its task vector tolerated only a 0.3 weight, and the best merge won
  by less.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Bump when the build changes in a way the settings do not capture (data, training loop, layout).
ZOO_FORMAT_VERSION = 1


class ModelSettings(BaseModel):
    """Shape of the zoo's Llama (the Mistral twins share it)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(160, gt=0)
    intermediate_size: int = Field(448, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    max_position_embeddings: int = Field(256, gt=0)


class FineTuneSettings(BaseModel):
    """One training run: ``steps`` AdamW steps of ``batch_size`` windows at peak ``lr`` (cosine decay);
    ``english_mix`` is the fraction of each batch drawn from the English corpus; ``trainable`` is
    ``all``, ``embeddings``, ``lower:N`` or ``upper:N`` (see :mod:`evomerge_opt.zoo.train`)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    english_mix: float = Field(0.0, ge=0, lt=1)
    trainable: str = "all"


class ZooSettings(BaseModel):
    """Everything that determines the zoo's weights and data (the cache key is a hash of it)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    # corpus and tasks
    max_paragraphs: int = Field(6000, gt=0)
    max_words: int = Field(60, gt=4)
    num_number_sentences: int = Field(3000, ge=0)
    max_operand: int = Field(10, ge=1, le=20)
    eval_size: int = Field(160, gt=0)  # cap of each arithmetic dev/test set
    eval_size_text: int = Field(120, gt=0)  # cap of each English / made-up-language dev/test set
    # tokenizer and model
    vocab_size: int = Field(6144, ge=512)
    model: ModelSettings = ModelSettings()
    seq_len: int = Field(64, ge=8)
    batch_size: int = Field(16, gt=0)
    # training
    pretrain: FineTuneSettings = FineTuneSettings(steps=300, lr=2e-3)
    # Arithmetic lives in the upper layers, the made-up language in the embeddings and the first layer:
    # the split that lets a merge (and a layer-wise recipe) combine them; see docs/ARCHITECTURE.md.
    math: FineTuneSettings = FineTuneSettings(steps=200, lr=2e-3, english_mix=0.2, trainable="upper:3")
    lang: FineTuneSettings = FineTuneSettings(steps=150, lr=3e-3, english_mix=0.2, trainable="lower:1")
    mistral_twins: bool = True
    threads: int = Field(1, ge=1)

    def settings_hash(self) -> str:
        """sha256 (16 hex) of the settings and the zoo format version: the cache key."""
        payload = json.dumps({"v": ZOO_FORMAT_VERSION, "settings": self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def preset(name: Literal["default", "small"] | str) -> ZooSettings:
    """``default``: the demo's zoo (a few minutes on 2 cores); ``small``: seconds, for the test suite."""
    if name == "default":
        return ZooSettings()
    if name == "small":
        return ZooSettings(
            max_paragraphs=400,
            num_number_sentences=300,
            max_operand=4,
            eval_size=24,
            eval_size_text=24,
            vocab_size=768,
            model=ModelSettings(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            seq_len=32,
            batch_size=4,
            pretrain=FineTuneSettings(steps=12, lr=3e-3),
            math=FineTuneSettings(steps=6, lr=3e-3, english_mix=0.25, trainable="upper:1"),
            lang=FineTuneSettings(steps=6, lr=1e-2, english_mix=0.25, trainable="lower:1"),
        )
    from evomerge_opt.errors import ConfigError

    raise ConfigError(f"Unknown zoo preset {name!r}; valid presets are: default, small.")


PRESETS = ("default", "small")
