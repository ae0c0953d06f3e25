"""SparseGPT's importance arithmetic on one Hessian (no model, no data).

    H <- H + 0.01 * mean(diag H) * I                     (dead inputs, diag 0, get H_jj = 1 first)
    U = cholesky(H^-1, upper=True)                       [in, in]
    column_scale = diag(U)^2                             [in]
    importance(d) = d^2 / column_scale[None, :]          [out, in]  (d: the task vector)
"""

from __future__ import annotations

import logging

import torch

from evomerge_opt.errors import ModelSourceError, ShapeMismatchError

logger = logging.getLogger(__name__)

DIAG_PREFIX = "diagH::"  # cache entries holding diag(H_damped) (for the `wanda` criterion)
CRITERIA = ("sparsegpt", "wanda")
DEFAULT_DAMP = 0.01


def damped_hessian(hessian: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """``H`` with dead inputs (``H_jj = 0``) set to 1 on the diagonal and ``damp * mean(diag H)`` added."""
    h = hessian.clone().float()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(damp * float(diag.mean()))
    return h


def column_scale_from_hessian(hessian: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """``diag(U)^2`` with ``U = cholesky(H_damped^-1, upper=True)``; shape ``[in]``.

    If the Cholesky factorisation fails (``H`` numerically not positive definite), the damping is
    multiplied by 10 and retried, up to 1.0 (a warning is logged).
    """
    current = damp
    while True:
        h = damped_hessian(hessian, current)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0:
                return torch.diagonal(upper).pow(2).contiguous()
        if current >= 1.0:
            raise ModelSourceError(
                f"The Hessian is not positive definite even with damping {current}; the calibration data "
                "may be too small or the model degenerate."
            )
        logger.warning("Cholesky failed with damping %g; retrying with %g", current, current * 10)
        current *= 10


def importance_scores(delta: torch.Tensor, column_scale: torch.Tensor) -> torch.Tensor:
    """SparseGPT importance ``d^2 / diag(U)^2`` broadcast over input columns: ``[out, in]``, float32."""
    if delta.dim() != 2 or column_scale.shape != (delta.shape[1],):
        raise ShapeMismatchError(
            f"importance needs delta [out, in] and a column scale [in], but got {tuple(delta.shape)} and "
            f"{tuple(column_scale.shape)}."
        )
    return delta.float().pow(2) / column_scale.to(device=delta.device, dtype=torch.float32).unsqueeze(0)
