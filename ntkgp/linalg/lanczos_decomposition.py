r"""Lanczos decomposition :math:`A \approx Q T Q^\top` with full reorthogonalization (for LOVE).

``k`` steps of Lanczos on a symmetric positive definite :math:`A` ``(M, M)`` from a start vector
give an orthonormal :math:`Q` ``(M, k)`` spanning the Krylov space and :math:`T = Q^\top A Q`
``(k, k)`` (tridiagonal up to rounding). Every new vector is orthogonalized twice against all of
:math:`Q` (classical Gram-Schmidt in float64), and :math:`T` is computed as :math:`Q^\top (AQ)` from
the stored products, so it holds to rounding whatever the loss of orthogonality in plain Lanczos.
When the Krylov space becomes invariant the recurrence restarts from a random vector orthogonal
to :math:`Q`, so ``k = M`` steps always give a complete basis and :math:`QT^{-1}Q^\top = A^{-1}`.
This is the block-width-one case of the block Lanczos basis (:mod:`ntkgp.linalg.block_lanczos`).

Because :math:`Q (Q^\top A Q)^{-1} Q^\top \preceq A^{-1}`, a predictive variance
:math:`k_{**} - k_*^\top Q T^{-1} Q^\top k_*` is never below the exact one (conservative).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ntkgp.linalg.block_lanczos import krylov_basis

__all__ = ["lanczos_decomposition"]


def lanczos_decomposition(
    matmul: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""``steps`` Lanczos steps with full reorthogonalization.

    The Krylov basis of block width one and :math:`T = Q^\top A Q` from
    :func:`~ntkgp.linalg.block_lanczos.krylov_basis` (the same code as the block Lanczos eigensolver).

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
    progress:
        A tqdm bar over the steps.

    Returns
    -------
    (Q, T)
        ``(M, k)`` orthonormal and ``(k, k)`` symmetric, float64.
    """
    return krylov_basis(
        matmul, start.reshape(-1, 1), steps, generator=generator, progress=progress, desc="Lanczos (LOVE)"
    )
