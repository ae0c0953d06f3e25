"""Dtype names a config may use, without importing torch (config validation runs before torch loads).

:data:`DTYPE_ALIASES` maps each accepted name to the torch dtype attribute it means;
:mod:`evomerge_opt.config.model_config` turns it into ``torch.dtype`` values.
"""

from __future__ import annotations

DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
