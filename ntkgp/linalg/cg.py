r"""Batched preconditioned conjugate gradients, with the Lanczos coefficients of its recurrences.

For a symmetric positive definite :math:`A` ``(M, M)`` (given by its matmul), a preconditioner
:math:`P \approx A` (given by :math:`v \mapsto P^{-1} v`) and right-hand sides ``B`` ``(M, t)``,
:func:`conjugate_gradients` solves :math:`A X = B` column by column, all columns in one batched
matmul per iteration (columns that have converged drop out of the matmul).

Preconditioned CG on :math:`A` with right-hand side :math:`b` is CG on
:math:`\hat A = R^{-1} A R^{-\top}` (any :math:`R R^\top = P`) with right-hand side
:math:`R^{-1} b`, and its step sizes :math:`a_j` and direction updates :math:`b_j` are the
Lanczos coefficients of :math:`\hat A` started at :math:`R^{-1} b/\lVert R^{-1} b\rVert`
(:func:`lanczos_tridiagonal`). Stochastic Lanczos quadrature (:mod:`ntkgp.linalg.slq`) uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ntkgp.progress import progress_bar

__all__ = ["CGResult", "conjugate_gradients", "lanczos_tridiagonal"]

Operator = Callable[[Tensor], Tensor]


@dataclass
class CGResult:
    """What a batched CG run reached.

    Attributes
    ----------
    solution:
        :math:`X \\approx A^{-1} B`, ``(M, t)``, float64.
    iterations:
        Iterations run per column, ``(t,)`` (a zero column takes none).
    residuals:
        Reached relative residuals :math:`\\lVert b - A x\\rVert / \\lVert b\\rVert` per column,
        ``(t,)``: the true residual, recomputed by one extra matmul at the end (``0`` for a zero
        right-hand side).
    step_sizes, updates:
        CG coefficients :math:`a_j` and :math:`b_j` ``(iterations_max, t)``; only the first
        ``iterations[i]`` (resp. ``iterations[i] - 1``) rows of column ``i`` are meaningful.
    converged:
        Whether every column reached the tolerance.
    """

    solution: Tensor
    iterations: Tensor
    residuals: Tensor
    step_sizes: Tensor
    updates: Tensor
    converged: bool

    @property
    def max_residual(self) -> float:
        """The largest reached relative residual over the columns."""
        return float(self.residuals.max()) if self.residuals.numel() else 0.0


def _identity(v: Tensor) -> Tensor:
    return v


def conjugate_gradients(
    matmul: Operator,
    rhs: Tensor,
    *,
    precondition: Operator | None = None,
    tolerance: float = 1e-8,
    max_iterations: int = 1000,
    progress: bool = False,
    reduce: Operator | None = None,
) -> CGResult:
    r"""Solve :math:`A X = B` by preconditioned CG, batched over the columns of ``B``.

    Parameters
    ----------
    matmul:
        :math:`V \mapsto A V` for ``V`` ``(M, t')``, any ``t' <= t``; :math:`A` symmetric positive
        definite.
    rhs:
        :math:`B`, ``(M, t)``; converted to float64.
    precondition:
        :math:`V \mapsto P^{-1} V` (``None``: no preconditioner), :math:`P` symmetric positive definite.
    tolerance:
        Stop a column when :math:`\lVert b - A x\rVert \le` ``tolerance`` :math:`\lVert b\rVert`
        (the recursively updated residual).
    max_iterations:
        At most this many iterations (batched matmuls).
    progress:
        A tqdm bar over the iterations.
    reduce:
        With the rows of ``B`` (and of every iterate) sharded over processes: sums the per-column
        partial inner products ``(t,)`` over the ranks (:meth:`~ntkgp.distributed.Sharding.sum_`), so
        that every rank takes the same steps. ``None``: one process.

    Returns
    -------
    CGResult
        Solution, iterations, reached (true) relative residuals and the Lanczos coefficients.

    Notes
    -----
    Iteration :math:`j` (per column): :math:`a_j = r_j^\top z_j / p_j^\top A p_j`,
    :math:`x_{j+1} = x_j + a_j p_j`, :math:`r_{j+1} = r_j - a_j A p_j`, :math:`z = P^{-1} r`,
    :math:`b_j = r_{j+1}^\top z_{j+1} / r_j^\top z_j`, :math:`p_{j+1} = z_{j+1} + b_j p_j`.
    """
    precondition = precondition or _identity
    total = reduce or _identity
    b = rhs.to(torch.float64)
    M, t = b.shape
    x = torch.zeros_like(b)
    r = b.clone()
    norms = _column_norms(b, reduce)  # shape: (t,)
    z = precondition(r)
    p = z.clone()
    rz = total((r * z).sum(0))  # shape: (t,)
    active = norms > 0
    iterations = torch.zeros(t, dtype=torch.long, device=b.device)
    step_sizes: list[Tensor] = []
    updates: list[Tensor] = []
    for _ in progress_bar(range(max_iterations), desc="CG iterations", enable=progress):
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(-1)
        ap = matmul(p[:, idx]).to(torch.float64)  # shape: (M, t_active)
        a = rz[idx] / total((p[:, idx] * ap).sum(0))
        x[:, idx] += a * p[:, idx]
        r[:, idx] -= a * ap
        step = torch.zeros(t, dtype=torch.float64, device=b.device)
        step[idx] = a
        step_sizes.append(step)
        iterations[idx] += 1
        done = _column_norms(r[:, idx], reduce) <= tolerance * norms[idx]
        z_new = precondition(r[:, idx])
        rz_new = total((r[:, idx] * z_new).sum(0))
        beta = rz_new / rz[idx]
        update = torch.zeros(t, dtype=torch.float64, device=b.device)
        update[idx] = beta
        updates.append(update)
        p[:, idx] = z_new + beta * p[:, idx]
        rz[idx] = rz_new
        active[idx[done]] = False
    residuals = _true_residuals(matmul, b, x, norms, reduce)
    empty = torch.zeros(0, t, dtype=torch.float64, device=b.device)
    return CGResult(
        solution=x,
        iterations=iterations,
        residuals=residuals,
        step_sizes=torch.stack(step_sizes) if step_sizes else empty,
        updates=torch.stack(updates) if updates else empty,
        converged=not bool(active.any()),
    )


def _column_norms(v: Tensor, reduce: Operator | None) -> Tensor:
    """Column norms ``(t,)`` of ``v`` (its rows on every rank, with ``reduce``)."""
    return v.norm(dim=0) if reduce is None else reduce(v.square().sum(0)).sqrt()


def _true_residuals(matmul: Operator, b: Tensor, x: Tensor, norms: Tensor, reduce: Operator | None = None) -> Tensor:
    """:math:`\\lVert b - A x\\rVert / \\lVert b\\rVert` per column, ``(t,)`` (0 for zero columns)."""
    nonzero = norms > 0
    out = torch.zeros_like(norms)
    if bool(nonzero.any()):
        idx = nonzero.nonzero().squeeze(-1)
        res = b[:, idx] - matmul(x[:, idx]).to(torch.float64)
        out[idx] = _column_norms(res, reduce) / norms[idx]
    return out


def lanczos_tridiagonal(step_sizes: Tensor, updates: Tensor, steps: int) -> Tensor:
    r"""The Lanczos tridiagonal :math:`T` ``(k, k)`` of one CG column from its coefficients.

    With step sizes :math:`a_0..a_{k-1}` and updates :math:`b_0..b_{k-2}` (``steps = k``):

    .. math::
        T_{00} = 1/a_0,\quad T_{jj} = 1/a_j + b_{j-1}/a_{j-1},\quad
        T_{j,j+1} = T_{j+1,j} = \sqrt{b_j}/a_j.

    Parameters
    ----------
    step_sizes, updates:
        One column's coefficients, ``(>= k,)`` each.
    steps:
        :math:`k`, the number of CG iterations that column ran.
    """
    a = step_sizes[:steps]
    diag = a.reciprocal()
    if steps > 1:
        b = updates[: steps - 1]
        diag = diag.clone()
        diag[1:] += b / a[:-1]
        off = b.clamp_min(0).sqrt() / a[:-1]
        return torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.diag(diag)
