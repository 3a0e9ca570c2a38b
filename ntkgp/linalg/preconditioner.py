r"""Low-rank-plus-diagonal preconditioner :math:`P = L L^\top + S` from a partial pivoted Cholesky.

:func:`pivoted_cholesky` builds :math:`L` ``(M, k)`` with :math:`K \approx L L^\top` from the
diagonal of :math:`K` and columns of :math:`K` at chosen pivots (greedy: largest residual
diagonal first, evaluated in blocks so that each block of columns is one batched product).
:class:`LowRankPlusDiagonal` applies :math:`P^{-1}` (Woodbury), a square root :math:`R`
(:math:`RR^\top = P`) and :math:`\log|P|`, all exact, from one thin SVD of
:math:`U = S^{-1/2} L = V\Sigma W^\top`:

.. math::
    R = S^{1/2}\bigl(I + V(\sqrt{1+\Sigma^2} - I)V^\top\bigr),\qquad
    P^{-1} = S^{-1/2}\bigl(I + V((I+\Sigma^2)^{-1} - I)V^\top\bigr)S^{-1/2},\qquad
    \log|P| = \textstyle\sum\log s + \sum\log(1+\sigma_j^2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["LowRankPlusDiagonal", "pivoted_cholesky"]


def pivoted_cholesky(
    diagonal: Tensor,
    columns: Callable[[Tensor], Tensor],
    rank: int,
    *,
    block: int = 32,
    rel_tol: float = 1e-12,
    trace_tol: float = 0.0,
) -> Tensor:
    r"""Partial pivoted Cholesky :math:`K \approx L L^\top` of a PSD matrix given by columns.

    Parameters
    ----------
    diagonal:
        :math:`\operatorname{diag} K`, ``(M,)``.
    columns:
        Indices ``(b,)`` -> :math:`K[:, \text{idx}]` ``(M, b)``.
    rank:
        At most this many pivots (columns of :math:`L`).
    block:
        Candidate pivots evaluated per batched call: the ``block`` largest residual diagonals;
        within a block the pivots are taken greedily (largest current residual first).
    rel_tol:
        Stop when the largest residual diagonal is below ``rel_tol`` times the largest diagonal.
    trace_tol:
        Stop when the residual trace :math:`\operatorname{tr}(K - LL^\top)` is at most this.

    Returns
    -------
    Tensor
        :math:`L`, ``(M, k)``, ``k <= rank``, float64. The residual :math:`K - LL^\top` is PSD
        with diagonal ``diagonal - (L*L).sum(1)``.
    """
    d = diagonal.to(torch.float64).clone()
    M = d.numel()
    rank = min(rank, M)
    L = torch.zeros(M, rank, dtype=torch.float64, device=d.device)
    k = 0
    stop = rel_tol * float(d.max()) if M else 0.0
    while k < rank and float(d.max()) > stop and float(d.sum()) > trace_tol:
        cand = torch.topk(d, min(block, rank - k)).indices
        cols = columns(cand).to(torch.float64)  # shape: (M, b)
        left = list(range(cand.numel()))
        while left and k < rank:
            j = max(left, key=lambda i: float(d[cand[i]]))
            i = int(cand[j])
            if float(d[i]) <= stop or float(d.sum()) <= trace_tol:
                break
            left.remove(j)
            col = cols[:, j] - L[:, :k] @ L[i, :k]  # residual column, shape: (M,)
            L[:, k] = col / float(d[i]) ** 0.5
            d = (d - L[:, k].square()).clamp_min(0)
            d[i] = 0
            k += 1
    return L[:, :k]


class LowRankPlusDiagonal:
    r""":math:`P = L L^\top + \operatorname{diag}(s)`: inverse, square root and log-determinant.

    Parameters
    ----------
    factor:
        :math:`L`, ``(M, k)`` (``k = 0``: the diagonal preconditioner :math:`P = S`).
    diagonal:
        :math:`s`, ``(M,)``, positive.
    """

    def __init__(self, factor: Tensor, diagonal: Tensor) -> None:
        s = diagonal.to(torch.float64)
        self.root_s = s.sqrt()  # shape: (M,)
        self.log_s = s.log().sum()
        u = factor.to(torch.float64) / self.root_s.unsqueeze(-1)  # shape: (M, k)
        if u.shape[-1]:
            self.v, sigma, _ = torch.linalg.svd(u, full_matrices=False)  # shape: (M, k), (k,)
        else:
            self.v, sigma = u, u.new_zeros(0)
        self.sigma_sq = sigma.square()

    def logdet(self) -> Tensor:
        r""":math:`\log|P|`, scalar."""
        return self.log_s + self.sigma_sq.log1p().sum()

    def _core(self, w: Tensor, scale: Tensor) -> Tensor:
        # (I + V diag(scale) V^T) w, shape: (M, t)
        return w + self.v @ (scale.unsqueeze(-1) * (self.v.T @ w))

    def solve(self, rhs: Tensor) -> Tensor:
        r""":math:`P^{-1}\,\text{rhs}`, ``(M, t)``."""
        scaled = rhs / self.root_s.unsqueeze(-1)
        return self._core(scaled, self.sigma_sq.add(1).reciprocal() - 1) / self.root_s.unsqueeze(-1)

    def root(self, w: Tensor) -> Tensor:
        r""":math:`R w` with :math:`RR^\top = P`, ``(M, t)``."""
        return self.root_s.unsqueeze(-1) * self._core(w, self.sigma_sq.add(1).sqrt() - 1)

    def root_inv_t(self, w: Tensor) -> Tensor:
        r""":math:`R^{-\top} w = P^{-1} R w`, ``(M, t)``."""
        return self._core(w, self.sigma_sq.add(1).rsqrt() - 1) / self.root_s.unsqueeze(-1)
