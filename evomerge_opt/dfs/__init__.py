"""Data-flow-space (DFS) merging: Evo*Affine wrappers, in-memory candidates, portable output dirs.

Importing this package registers the Evo*Affine configs and models with the transformers Auto classes
(``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``, ``AutoModelForSequenceClassification``), so
a saved DFS directory also loads in-process without ``trust_remote_code``.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from evomerge_opt.dfs.modeling_evo_affine import (
    EvoAffineHop,
    EvoLlamaAffineConfig,
    EvoLlamaAffineForCausalLM,
    EvoLlamaAffineForSequenceClassification,
    EvoLlamaAffineModel,
    EvoMistralAffineConfig,
    EvoMistralAffineForCausalLM,
    EvoMistralAffineForSequenceClassification,
    EvoMistralAffineModel,
)


def _register() -> None:
    for config_cls, base, causal, seq_cls in (
        (EvoLlamaAffineConfig, EvoLlamaAffineModel, EvoLlamaAffineForCausalLM, EvoLlamaAffineForSequenceClassification),
        (
            EvoMistralAffineConfig,
            EvoMistralAffineModel,
            EvoMistralAffineForCausalLM,
            EvoMistralAffineForSequenceClassification,
        ),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, causal, exist_ok=True)
        AutoModelForSequenceClassification.register(config_cls, seq_cls, exist_ok=True)


_register()

__all__ = [
    "EvoAffineHop",
    "EvoLlamaAffineConfig",
    "EvoLlamaAffineForCausalLM",
    "EvoLlamaAffineForSequenceClassification",
    "EvoLlamaAffineModel",
    "EvoMistralAffineConfig",
    "EvoMistralAffineForCausalLM",
    "EvoMistralAffineForSequenceClassification",
    "EvoMistralAffineModel",
]
