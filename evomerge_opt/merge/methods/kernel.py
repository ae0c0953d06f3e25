"""The generic chunked kernel: trim -> (TIES elect + disjoint merge | weighted sum), then ``b + lam * ...``.

Notation: base ``b``, task vectors ``d_i = x_i - b``, weights ``w_i``, densities ``k_i``, scale ``lam``,
``W = sum_i w_i``. Everything is computed in float32 whatever the stored dtype.

* ``linear``:          ``out = sum_i w_i x_i / W`` (normalize, default) or ``sum_i w_i x_i``;
  computed as ``b + sum_i w_i d_i / W`` (resp. ``W b + sum_i w_i d_i``), the same value.
* ``task_arithmetic``: ``out = b + lam * sum_i w_i d_i`` (``/ W`` only when normalize is set).
* ``ties``:            trim ``t_i`` = the ``round(k_i * numel)`` largest ``|d_i|`` (ties at the threshold
  broken by index, as :func:`~evomerge_opt.merge._base.topk_mask`); elect ``s = sign(sum_i w_i t_i)``
  with 0 -> +; disjoint merge over ``m_i = [sign(w_i t_i) == s]`` (a pruned zero never agrees):
  ``out = b + lam * sum_i w_i t_i m_i / sum_i w_i m_i`` (den 0 -> 1), or ``b + lam * num`` without
  normalize.
* ``dare_ties`` / ``dare_linear``: mask ``~ Bernoulli(k_i)`` (seeded per tensor and source), rescale
  (``inverse_density``: ``/ k_i``; ``l1``: ``* |d_i|_1 / |d_i m_i|_1``; ``none``), then TIES' elect +
  disjoint merge, or ``b + lam * sum_i w_i d'_i`` (``/ W`` with normalize, its default).

Trimming uses the sparsifier named by ``parameters.sparsify`` (``sparsegpt`` importance plugs in here
for every trimming method) and ``parameters.rescale`` applies to every trimming method.

How it is computed (the reason for the shape of this module): a merge is ~30 elementwise passes
over each tensor. Done on whole tensors (the 28M-entry embedding of a 135M model is 113 MB in
float32 per operand) every pass streams through main memory and the temporaries cost gigabytes.
So the kernel works on flat chunks of :data:`CHUNK` entries that stay in cache, reading the task
vectors chunk by chunk from :class:`TensorInputs` (the streaming path derives them from the stored
bf16/fp16 tensors on the fly, the resident path slices its float32 copies) and writing the result
straight into the output dtype. Magnitude trimming finds its exact threshold by sampling a band
around it and selecting inside the band (``kthvalue`` on ~1% of the entries), so no full sort or
full-size selection is needed; when the inputs hold the sorted ``|d|`` (the resident merger's
magnitude index) the threshold is a lookup plus two binary searches instead. Every step is
elementwise or an ordered count, so the result does not depend on the chunk size and both paths
produce identical tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evomerge_opt.errors import ConfigError, NonFiniteResultError
from evomerge_opt.merge._base import TensorContext
from evomerge_opt.merge.methods._base import MergeMethod, TensorParams
from evomerge_opt.merge.methods.inputs import TensorInputs
from evomerge_opt.merge.methods.keepers import (
    MaskKeeper,
    ThresholdKeeper,
    full_mask,
    make_keeper,
    rescale_factor,
)
from evomerge_opt.merge.methods.workspace import Workspace, chunks, workspace

FP16_MAX = 65504.0
TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: den floor when all weights are positive


def total_weight(weights: list[float], what: str) -> float:
    total = float(sum(weights))
    if total <= 0:
        raise ConfigError(
            f"With normalize on the total weight must be > 0 (it divides the merge), but the weights "
            f"{weights} sum to {total:g} for tensor {what!r}; make the total positive or set "
            "parameters.normalize: false."
        )
    return total


class TrimMergeMethod(MergeMethod):
    """The generic kernel: per chunk, trim each task vector, combine (``elect``: TIES sign election and
    disjoint merge; else a weighted sum, divided by ``W`` with normalize), scale by ``lam`` and add the
    base (``linear`` without normalize: ``W b + sum``). Subclasses set the class attributes."""

    def merge(self, inputs: TensorInputs, params: TensorParams, ctxs: list[TensorContext], out: torch.Tensor) -> None:
        """Write the merged tensor into ``out`` (flat, output dtype, on ``inputs.device``)."""
        name = ctxs[0].name
        keepers, scales = [], []
        for i, (density, weight, ctx) in enumerate(zip(params.densities, params.weights, ctxs)):
            keeper = make_keeper(inputs, i, density, params, ctx)
            if params.rescale == "l1" and isinstance(keeper, ThresholdKeeper):
                keeper = MaskKeeper(full_mask(inputs, i, keeper))  # l1 needs two passes: a stateless mask
            keepers.append(keeper)
            scales.append(weight * rescale_factor(inputs, i, density, keeper, params.rescale))
        divisor = total_weight(params.weights, name) if params.normalize and not self.elect else 1.0
        lam = 1.0 if self.linear else params.lam
        base_scale = float(sum(params.weights)) if self.linear and not params.normalize else 1.0
        space = workspace(inputs.device)
        finite = True
        for start, end in chunks(inputs):
            length = end - start
            base = inputs.base_chunk(start, end, space("base", length))
            terms = []
            for i, keeper in enumerate(keepers):
                delta = inputs.delta_chunk(i, start, end, base, space(f"d{i}", length))
                trimmed = keeper.trim(start, end, delta, space(f"t{i}", length))
                if trimmed is delta:  # kept whole: never write into (possibly resident) task vectors
                    term = torch.mul(delta, scales[i], out=space(f"t{i}", length))
                else:
                    term = trimmed.mul_(scales[i]) if scales[i] != 1.0 else trimmed
                terms.append(term)  # w_i * rescale_i * trim(d_i)
            if self.elect:
                mixed = _elect_and_merge(terms, params.weights, params.normalize, space, length)
            else:
                mixed = terms[0]
                for term in terms[1:]:
                    mixed.add_(term)
                if divisor != 1.0:
                    mixed.div_(divisor)
            if lam != 1.0:
                mixed.mul_(lam)
            # float32 output: the last add writes straight into it (the same kernel, no extra copy).
            target = out[start:end] if out.dtype == torch.float32 else mixed
            if base_scale != 1.0:
                torch.add(mixed, base, alpha=base_scale, out=target)
            else:
                torch.add(mixed, base, out=target)
            # NaN/inf check at the cost of one reduction: a non-finite sum flags the chunk
            # (a false alarm from overflowing huge values is settled by the exact check below).
            if not math.isfinite(float(target.sum())) or (
                out.dtype == torch.float16 and float(target.abs().max()) > FP16_MAX
            ):
                finite = False
            if target is mixed:
                out[start:end].copy_(mixed)
        if not finite:
            _raise_if_not_finite(name, out)


def _raise_if_not_finite(name: str, out: torch.Tensor) -> None:
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise NonFiniteResultError(
            f"The merge of tensor {name!r} produced {bad} NaN/inf values (dtype {out.dtype}); check the "
            "sources for NaN/inf, the weights/lambda for overflow, or choose a wider output dtype."
        )


def _elect_and_merge(terms: list[torch.Tensor], weights: list[float], normalize: bool, space: Workspace,
                     length: int) -> torch.Tensor:
    """TIES steps 2-3 on one chunk of ``w_i t_i``: sign election (0 counts as +), disjoint mean."""
    sign = torch.add(terms[0], terms[1], out=space("total", length)) if len(terms) > 1 else \
        space("total", length).copy_(terms[0])
    for term in terms[2:]:
        sign.add_(term)
    # s = copysign(1, sum): +1 for +0.0 as the rule says. The sum is -0.0 only when every term is a
    # zero (x + (-x) rounds to +0.0), and then no term agrees whatever s is.
    torch.copysign(space.ones(length), sign, out=sign)
    num = space("num", length)
    den = space("den", length)
    agree = space("keep", length)
    for j, (term, weight) in enumerate(zip(terms, weights)):
        # [sign(w t) == s] = [w t * s > 0] as 1.0/0.0; a zero (pruned) entry never agrees.
        torch.gt(torch.mul(term, sign, out=agree), 0.0, out=agree)
        if j == 0:
            torch.mul(term, agree, out=num)
            torch.mul(agree, weight, out=den)
        else:
            num.addcmul_(term, agree)
            den.add_(agree, alpha=weight)
    if not normalize:
        return num
    if min(weights) >= TINY:
        # Positive weights: den is 0 exactly where no term agrees, and there num is a zero, so raising
        # den to TINY gives num / 1's result (a zero of num's sign) in one pass.
        den.clamp_(min=TINY)
    else:
        # den 0 -> 1 without bool kernels: add (1 - sign|den|), which is 1 exactly where den == 0, else 0.
        torch.abs(den, out=agree).sign_().neg_().add_(1.0)
        den.add_(agree)
    return num.div_(den)
