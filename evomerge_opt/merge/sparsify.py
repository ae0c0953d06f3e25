"""Sparsifiers: which entries of a task vector a merge keeps. ``SPARSIFIERS`` is the registry.

``magnitude`` keeps the top-k by ``|delta|`` (TIES), ``random`` draws ``Bernoulli(density)`` (DARE),
``sparsegpt`` (registered by :mod:`evomerge_opt.merge.sparsegpt`) keeps the top-k by SparseGPT importance.
"""

from __future__ import annotations

import torch

from evomerge_opt.merge._base import Sparsifier, TensorContext, topk_mask
from evomerge_opt.registry import Registry

SPARSIFIERS: Registry[Sparsifier] = Registry("sparsifier")


class MagnitudeSparsifier(Sparsifier):
    name = "magnitude"

    def mask(self, delta: torch.Tensor, density: float, ctx: TensorContext) -> torch.Tensor:
        return topk_mask(delta.abs(), density)


class RandomSparsifier(Sparsifier):
    """Keeps each entry with probability ``density``; the draw is seeded per (seed, tensor, source)."""

    name = "random"

    def mask(self, delta: torch.Tensor, density: float, ctx: TensorContext) -> torch.Tensor:
        if density >= 1.0:
            return torch.ones_like(delta, dtype=torch.bool)
        # Drawn on the CPU in float32 so the mask is identical on every device and for every dtype.
        uniform = torch.rand(delta.shape, generator=ctx.generator(), dtype=torch.float32)
        return (uniform < density).to(delta.device)


SPARSIFIERS.add("magnitude", MagnitudeSparsifier())
SPARSIFIERS.add("random", RandomSparsifier())


def get_sparsifier(name: str) -> Sparsifier:
    """Look up a sparsifier, importing optional ones (``sparsegpt``) on first use."""
    if name not in SPARSIFIERS and name == "sparsegpt":
        import evomerge_opt.merge.sparsegpt  # noqa: F401  (registers itself)
    return SPARSIFIERS.get(name)
