"""The ``sparsegpt`` sparsifier: TIES/DARE trimming by SparseGPT importance instead of magnitude.

For a Linear weight's task vector ``d`` ``[out, in]`` of source ``i``, the kept entries are the top
``round(density * numel)`` by ``d^2 / diag(U_i)^2`` (see :mod:`evomerge_opt.merge.sparsify.importance.scores`); entries
with the same ``|d|`` are kept preferentially where the input column's ``diag(U)^2`` is small (an
input the calibration data excites strongly, whose weight error costs most). Tensors that are not
decoder Linear weights (embeddings, norms, ``lm_head``) fall back to magnitude. Importing this module
registers the sparsifier (importing :mod:`evomerge_opt.merge.sparsify` does).
"""

from __future__ import annotations

import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.merge._base import Sparsifier, TensorContext, topk_mask
from evomerge_opt.merge.sparsify.importance.scores import damped_hessian, importance_scores
from evomerge_opt.merge.sparsify.registry import register


@register("sparsegpt")
class SparseGPTSparsifier(Sparsifier):
    name = "sparsegpt"

    def mask(self, delta: torch.Tensor, density: float, ctx: TensorContext) -> torch.Tensor:
        if ctx.importance is None:
            raise ConfigError(
                f"`sparsify: sparsegpt` needs calibration data to compute Hessian importance, but none was "
                f"given while merging {ctx.name!r}; add `calibration: [{{path: data.jsonl}}]` to the recipe "
                "(or pass --calibration DATA), or use `sparsify: magnitude`."
            )
        scale = ctx.importance.column_scale(ctx.source_index, ctx.name) if delta.dim() == 2 else None
        if scale is None:
            return topk_mask(delta.abs(), density)
        return topk_mask(importance_scores(delta, scale), density)


def obs_trim(delta: torch.Tensor, density: float, hessian: torch.Tensor, damp: float = 0.01,
             blocksize: int = 128) -> torch.Tensor:
    """SparseGPT's trimming WITH its error-compensating (OBS) update, applied to a task vector.

    ``delta`` ``[out, in]``, ``hessian`` ``[in, in]`` (undamped ``(2/N) X^T X``). Columns are processed
    left to right in blocks of ``blocksize``; in each block the ``1 - density`` fraction of entries with
    the smallest ``d^2 / diag(U)^2`` is pruned (SparseGPT's adaptive per-block mask), and the error of
    pruning each column is spread over the columns to its right (``d[:, j:] -= err_j * U[j, j:]``), so
    the layer's output on the calibration inputs changes as little as possible. Returns a float32
    tensor with ``delta``'s shape whose pruned entries are exactly zero (the kept ones are updated).

    This does not fit the mask-only :class:`Sparsifier` contract (it changes the kept values), so the
    merge engine cannot select it by name yet; ``benchmarks/sparsegpt_vs_magnitude.py`` measures it.
    """
    if delta.dim() != 2 or hessian.shape != (delta.shape[1], delta.shape[1]):
        raise ConfigError(
            f"obs_trim needs delta [out, in] and hessian [in, in], but got {tuple(delta.shape)} and "
            f"{tuple(hessian.shape)}."
        )
    w = delta.detach().float().clone()
    h = damped_hessian(hessian.to(w.device), damp)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # [in, in]
    columns = w.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1 = w[:, i1:i2].clone()  # [out, B]
        u1 = upper[i1:i2, i1:i2]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        keep1 = topk_mask(w1.pow(2) / torch.diagonal(u1).pow(2).unsqueeze(0), density)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = col * keep1[:, i]
            q1[:, i] = q
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return w
