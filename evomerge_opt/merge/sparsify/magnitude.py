"""``magnitude``: keep the top-k entries by ``|delta|`` (TIES' trimming)."""

from __future__ import annotations

import torch

from evomerge_opt.merge._base import Sparsifier, TensorContext, topk_mask
from evomerge_opt.merge.sparsify.registry import register


@register("magnitude")
class MagnitudeSparsifier(Sparsifier):
    name = "magnitude"

    def mask(self, delta: torch.Tensor, density: float, ctx: TensorContext) -> torch.Tensor:
        return topk_mask(delta.abs(), density)
