r"""Krylov and preconditioner pieces over rows sharded across processes (the CG route with a process group).

With a process group (:class:`~ntkgp.distributed.Sharding`) a vector of length ``M = N C`` lives
on the ranks by rows: each holds the rows of its training points. Products with the kernel are
one all-reduce of ``P``-vectors (:func:`~ntkgp.ntk.kernel_matmul` with ``reduce``); what else the
CG route needs becomes local work plus small collectives:

* :func:`sharded_pivoted_cholesky`: the partial pivoted Cholesky of
  :func:`~ntkgp.linalg.preconditioner.pivoted_cholesky`, each rank holding its rows of :math:`L`;
  candidate pivots are the global top residual diagonals; per pivot one all-reduce of the
  candidates' residual diagonals and :math:`L` rows;
* :class:`ShardedLowRankPlusDiagonal`: :math:`P = LL^\top + S` from a tall-skinny QR over the
  ranks (each rank's ``R`` factor gathered, ``k x k`` each) instead of an SVD of all of
  :math:`S^{-1/2}L`; the same :math:`P^{-1}`, :math:`R` and :math:`\log|P|`;
* :func:`sharded_krylov_basis`: the Lanczos basis of :func:`~ntkgp.linalg.block_lanczos.krylov_basis`
  with block width one (for the LOVE variances), inner products all-reduced;
* :func:`sharded_rademacher`: this rank's rows of the probe matrix one process would draw (the
  generator's stream is read in row order and the other rows are skipped).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ntkgp.distributed import Sharding
from ntkgp.linalg.block_lanczos import _DEFLATION_TOL
from ntkgp.linalg.preconditioner import LowRankPlusDiagonal
from ntkgp.linalg.slq import rademacher
from ntkgp.progress import progress_bar

__all__ = ["ShardedLowRankPlusDiagonal", "sharded_krylov_basis", "sharded_pivoted_cholesky", "sharded_rademacher"]

#: rows of the probe stream drawn at a time by :func:`sharded_rademacher`
_STREAM_ROWS = 2**16


def sharded_rademacher(
    start: int, rows: int, total: int, count: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """Rows ``start .. start + rows - 1`` of the ``(total, count)`` Rademacher matrix
    :func:`~ntkgp.linalg.slq.rademacher` draws from ``generator``: ``(rows, count)``, float64."""
    parts = []
    for first in range(0, start + rows, _STREAM_ROWS):
        size = min(_STREAM_ROWS, total - first)
        block = rademacher(size, count, generator, device)
        lo, hi = max(start, first), min(start + rows, first + size)
        if lo < hi:
            parts.append(block[lo - first : hi - first])
    return torch.cat(parts) if parts else torch.zeros(0, count, dtype=torch.float64, device=device)


def _norms(v: Tensor, sharding: Sharding) -> Tensor:
    """Column norms of a row-sharded ``(M_r, t)`` block, ``(t,)``."""
    return sharding.sum_(v.square().sum(0)).sqrt()


def sharded_pivoted_cholesky(
    diagonal: Tensor,
    columns: Callable[[Tensor], Tensor],
    rank: int,
    sharding: Sharding,
    row_offset: int,
    *,
    block: int = 32,
    rel_tol: float = 1e-12,
    trace_tol: float = 0.0,
) -> Tensor:
    r"""This rank's rows ``(M_r, k)`` of the partial pivoted Cholesky factor of
    :func:`~ntkgp.linalg.preconditioner.pivoted_cholesky`, for the local ``diagonal`` ``(M_r,)`` (global rows
    ``row_offset ..``) and ``columns`` (global row indices ``(b,)`` -> local rows ``(M_r, b)``). Collective."""
    d = diagonal.to(torch.float64).clone()
    mine, device = d.numel(), d.device
    total = sum(sharding.gather_counts(mine, device))
    rank = min(rank, total)
    L = torch.zeros(mine, rank, dtype=torch.float64, device=device)
    k = 0

    def global_max_sum() -> tuple[float, float]:
        both = torch.stack([d.max(), d.sum()])
        return float(sharding.max(both[:1])), float(sharding.sum_(both[1:].clone()))

    top, trace = global_max_sum()
    stop = rel_tol * top if total else 0.0
    while k < rank and top > stop and trace > trace_tol:
        b = min(block, rank - k)
        vals, idx = torch.topk(d, min(b, mine))
        pad = b - vals.numel()
        vals = torch.cat([vals, torch.full((pad,), -1.0, dtype=d.dtype, device=device)])
        idx = torch.cat([idx + row_offset, torch.full((pad,), -1, dtype=idx.dtype, device=device)])
        every = sharding.gather_rows(torch.stack([vals, idx.to(d.dtype)], 1), [b] * sharding.world_size)
        best = every[:, 0].topk(b).indices
        cand = every[best, 1].to(torch.long)
        cand = cand[cand >= 0]
        cols = columns(cand).to(torch.float64)  # shape: (M_r, b)
        local = cand - row_offset
        owned = (local >= 0) & (local < mine)
        left = list(range(cand.numel()))
        while left and k < rank:
            # the candidates' residual diagonals, the residual trace and the candidates' rows of L, from their owners
            part = torch.zeros(cand.numel() * (k + 1) + 1, dtype=torch.float64, device=device)
            at = torch.zeros(cand.numel(), k + 1, dtype=torch.float64, device=device)
            at[owned, 0] = d[local[owned]]
            at[owned, 1:] = L[local[owned], :k]
            part[:-1] = at.reshape(-1)
            part[-1] = d.sum()
            sharding.sum_(part)
            at, trace = part[:-1].reshape(cand.numel(), k + 1), float(part[-1])
            j = max(left, key=lambda i: float(at[i, 0]))
            if float(at[j, 0]) <= stop or trace <= trace_tol:
                break
            left.remove(j)
            col = cols[:, j] - L[:, :k] @ at[j, 1:]  # residual column, shape: (M_r,)
            L[:, k] = col / float(at[j, 0]) ** 0.5
            d = (d - L[:, k].square()).clamp_min(0)
            if bool(owned[j]):
                d[local[j]] = 0
            k += 1
        top, trace = global_max_sum()
    return L[:, :k]


class ShardedLowRankPlusDiagonal(LowRankPlusDiagonal):
    r""":class:`~ntkgp.linalg.preconditioner.LowRankPlusDiagonal` with :math:`L` and :math:`s` sharded by rows.

    :math:`U = S^{-1/2}L` is factored by a tall-skinny QR: each rank's :math:`U_r = Q_rR_r`, the stacked
    :math:`R_r` (gathered, ``k`` rows per rank) :math:`= Q'R'`, and :math:`R' = W\Sigma Z^\top`; then
    :math:`V_r = Q_r Q'_r W` are this rank's rows of :math:`U`'s left singular vectors. Collective.
    """

    def __init__(self, factor: Tensor, diagonal: Tensor, sharding: Sharding) -> None:
        self.sharding = sharding
        s = diagonal.to(torch.float64)
        self.root_s = s.sqrt()  # shape: (M_r,)
        self.log_s = sharding.sum_(s.log().sum().reshape(1))[0]
        u = factor.to(torch.float64) / self.root_s.unsqueeze(-1)  # shape: (M_r, k)
        width = u.shape[-1]
        if not width:
            self.v, self.sigma_sq = u, u.new_zeros(0)
            return
        q, r = torch.linalg.qr(u)  # shape: (M_r, j), (j, k), j = min(M_r, k)
        r = torch.cat([r, r.new_zeros(width - r.shape[0], width)])  # k rows from every rank
        stacked = sharding.gather_rows(r, [width] * sharding.world_size)  # shape: (W k, k)
        q2, r2 = torch.linalg.qr(stacked)  # shape: (W k, k), (k, k)
        w, sigma, _ = torch.linalg.svd(r2)
        start = sharding.rank * width
        self.v = q @ (q2[start : start + q.shape[1]] @ w)  # shape: (M_r, k)
        self.sigma_sq = sigma.square()

    def _core(self, w: Tensor, scale: Tensor) -> Tensor:
        # (I + V diag(scale) V^T) w, with V^T w summed over ranks
        return w + self.v @ (scale.unsqueeze(-1) * self.sharding.sum_(self.v.T @ w))


def sharded_krylov_basis(
    matmul: Callable[[Tensor], Tensor],
    start: Tensor,
    basis_size: int,
    sharding: Sharding,
    row_offset: int,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "Lanczos",
) -> tuple[Tensor, Tensor]:
    r""":func:`~ntkgp.linalg.block_lanczos.krylov_basis` of block width one with the rows sharded: this rank's
    rows of :math:`Q` ``(M_r, m)`` and the replicated :math:`T = Q^\top AQ` ``(m, m)``. Collective.

    A restart (the Krylov space invariant) draws the random vector one process would, all ``M`` rows
    of it, and keeps this rank's.
    """
    start = start.to(torch.float64).reshape(-1, 1)
    mine = start.shape[0]
    total = sum(sharding.gather_counts(mine, start.device))
    m = min(total, basis_size)
    qt = torch.zeros(m, mine, dtype=torch.float64, device=start.device)  # this rank's columns of Q^T
    aqt = torch.zeros_like(qt)

    def project_out(v: Tensor, filled: int) -> Tensor:
        rows = qt[:filled]
        for _ in range(2):
            v = v - rows.T @ sharding.sum_(rows @ v)
        return v

    def next_vector(v: Tensor, filled: int, scale: float) -> Tensor:
        residual = project_out(v, filled)
        norm = float(_norms(residual, sharding)[0])
        if norm > _DEFLATION_TOL * max(scale, torch.finfo(torch.float64).tiny):
            return residual / norm
        fresh = torch.randn(total, 1, generator=generator, dtype=torch.float64).to(v.device)
        fresh = project_out(fresh[row_offset : row_offset + mine], filled)
        fresh = fresh / _norms(fresh, sharding)
        return project_out(fresh, filled)

    qt[0] = next_vector(start, 0, float(_norms(start, sharding)[0]))[:, 0]
    scale = 0.0
    for j in progress_bar(range(m), desc=desc, enable=progress):
        product = matmul(qt[j : j + 1].T.contiguous()).to(torch.float64)  # shape: (M_r, 1)
        aqt[j] = product[:, 0]
        scale = max(scale, float(_norms(product, sharding)[0]))
        if j + 1 < m:
            qt[j + 1] = next_vector(product, j + 1, scale)[:, 0]
    projected = sharding.sum_(qt @ aqt.T)  # shape: (m, m)
    return qt.T.contiguous(), 0.5 * (projected + projected.T)
