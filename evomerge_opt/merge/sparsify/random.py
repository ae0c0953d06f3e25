"""``random``: keep each entry with probability ``density`` (DARE's drop), seeded per tensor and source."""

from __future__ import annotations

import torch

from evomerge_opt.merge._base import Sparsifier, TensorContext
from evomerge_opt.merge.sparsify.registry import register


@register("random")
class RandomSparsifier(Sparsifier):
    """Keeps each entry with probability ``density``; the draw is seeded per (seed, tensor, source)."""

    name = "random"

    def mask(self, delta: torch.Tensor, density: float, ctx: TensorContext) -> torch.Tensor:
        if density >= 1.0:
            return torch.ones_like(delta, dtype=torch.bool)
        # Drawn on the CPU in float32 so the mask is identical on every device and for every dtype.
        uniform = torch.rand(delta.shape, generator=ctx.generator(), dtype=torch.float32)
        return (uniform < density).to(delta.device)
