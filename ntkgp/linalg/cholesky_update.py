r"""A rank-``k`` update of a dense Cholesky factor: the factor of :math:`LL^\top + UU^\top` without refactoring."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cholesky_update"]

#: columns per panel of :func:`cholesky_update` (at least the update's rank)
PANEL = 32


def cholesky_update(factor: Tensor, update: Tensor, *, panel: int = PANEL) -> Tensor:
    r"""Lower factor of :math:`LL^\top + UU^\top` from ``factor`` :math:`L` ``(P, P)`` and ``update`` :math:`U`
    ``(P, k)``: a new ``(P, P)`` tensor.

    Blocked, left to right over panels ``j`` of columns, with :math:`W = L_{jj}^{-1}U_j`:

    .. math::
        L'_{jj} = L_{jj} M,\ MM^\top = I + WW^\top;\qquad
        L'_{bj} = (L_{bj} + U_b W^\top) M^{-\top};\qquad
        U_b \leftarrow (U_b - L_{bj} W) R^{-1},\ R^\top R = I + W^\top W,

    where ``b`` are the rows below the panel. The last step rotates the update's columns so that
    the panel's part of :math:`[L\ U]` is :math:`[L'_{jj}\ 0]` (an orthogonal transformation of
    :math:`[L\ U]`, whose Gram it keeps). :math:`O(P^2 (k + \text{panel}))` flops, no :math:`P^3` term.
    The weight-space solver keeps a rank-``k`` term apart instead
    (:class:`~ntkgp.linalg.woodbury.WoodburyFactor`) and calls this only when a dense factor is needed.
    """
    P, k = update.shape
    out = factor.clone()
    u = update.clone()
    width = max(panel, k)
    eye_k = torch.eye(k, dtype=factor.dtype, device=factor.device)
    eye_panel = torch.eye(width, dtype=factor.dtype, device=factor.device)
    for s in range(0, P, width):
        e = min(s + width, P)
        ljj, uj = out[s:e, s:e], u[s:e]
        w = torch.linalg.solve_triangular(ljj, uj, upper=False)  # shape: (nb, k)
        m = torch.linalg.cholesky(eye_panel[: e - s, : e - s] + w @ w.mT)
        lbj, ub = out[e:, s:e], u[e:]
        new_lbj = torch.linalg.solve_triangular(m, (lbj + ub @ w.mT).mT, upper=False).mT
        r = torch.linalg.cholesky(eye_k + w.mT @ w)  # lower: R = r^T
        u[e:] = torch.linalg.solve_triangular(r, (ub - lbj @ w).mT, upper=False).mT
        out[s:e, s:e] = ljj @ m
        out[e:, s:e] = new_lbj
    return out
