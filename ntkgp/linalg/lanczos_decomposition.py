r"""Lanczos decomposition :math:`A \approx Q T Q^\top` with full reorthogonalization (for LOVE).

``k`` steps of Lanczos on a symmetric positive definite :math:`A` ``(M, M)`` from a start vector
give an orthonormal :math:`Q` ``(M, k)`` spanning the Krylov space and :math:`T = Q^\top A Q`
``(k, k)`` (tridiagonal up to rounding). Every new vector is orthogonalized twice against all of
:math:`Q` (classical Gram-Schmidt in float64), and :math:`T` is assembled from those projections,
so :math:`T = Q^\top A Q` holds to rounding whatever the loss of orthogonality in plain Lanczos.
When the Krylov space becomes invariant the recurrence restarts from a random vector orthogonal
to :math:`Q`, so ``k = M`` steps always give a complete basis and :math:`QT^{-1}Q^\top = A^{-1}`.

Because :math:`Q (Q^\top A Q)^{-1} Q^\top \preceq A^{-1}`, a predictive variance
:math:`k_{**} - k_*^\top Q T^{-1} Q^\top k_*` is never below the exact one (conservative).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ntkgp.progress import progress_bar

__all__ = ["lanczos_decomposition"]


def lanczos_decomposition(
    matmul: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    breakdown: float = 1e-10,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""``steps`` Lanczos steps with full reorthogonalization.

    Parameters
    ----------
    matmul:
        :math:`V \mapsto A V` for ``V`` ``(M, 1)``.
    start:
        Start vector ``(M,)`` (a random one if it is zero).
    steps:
        :math:`k \le M`.
    generator:
        For restart vectors.
    breakdown:
        Restart when the new vector's norm falls below ``breakdown`` times the largest
        :math:`\lvert T_{jj}\rvert` so far.

    Returns
    -------
    (Q, T)
        ``(M, k)`` orthonormal and ``(k, k)`` symmetric, float64.
    """
    q = start.to(torch.float64).reshape(-1)
    M = q.numel()
    steps = min(steps, M)
    Q = torch.zeros(M, steps, dtype=torch.float64, device=q.device)
    T = torch.zeros(steps, steps, dtype=torch.float64, device=q.device)
    if q.norm() == 0:
        q = _random_orthogonal(Q[:, :0], generator)
    Q[:, 0] = q / q.norm()
    scale = 0.0
    for j in progress_bar(range(steps), desc="Lanczos (LOVE)", enable=progress):
        w = matmul(Q[:, j : j + 1]).to(torch.float64).reshape(-1)
        h = Q[:, : j + 1].T @ w
        w = w - Q[:, : j + 1] @ h
        h2 = Q[:, : j + 1].T @ w  # second Gram-Schmidt pass
        w = w - Q[:, : j + 1] @ h2
        T[: j + 1, j] = h + h2
        scale = max(scale, abs(float(T[j, j])))
        if j + 1 == steps:
            break
        norm = float(w.norm())
        if norm <= breakdown * scale:
            w = _random_orthogonal(Q[:, : j + 1], generator)  # invariant subspace: restart
        Q[:, j + 1] = w / w.norm()
    # T[i, j] = q_i^T A q_j for i <= j, from the projections; mirror the upper triangle
    T = torch.triu(T)
    T = T + torch.triu(T, 1).T
    return Q, T


def _random_orthogonal(basis: Tensor, generator: torch.Generator | None) -> Tensor:
    """A random vector orthogonal to the columns of ``basis`` ``(M, j)`` (twice projected)."""
    v = torch.randn(basis.shape[0], generator=generator, dtype=torch.float64).to(basis.device)
    for _ in range(2):
        v = v - basis @ (basis.T @ v)
    return v
