r"""Top eigenpairs of a symmetric PSD operator by block Lanczos with full reorthogonalization.

For a symmetric ``n x n`` operator :math:`A` given only by products :math:`A V`, block Lanczos
builds an orthonormal basis :math:`Q = [Q_0, Q_1, \dots, Q_{s-1}]` ``(n, m)``, ``m = s b``, of the
block Krylov space :math:`\operatorname{span}\{Q_0, A Q_0, \dots, A^{s-1} Q_0\}` from a random
start block :math:`Q_0` ``(n, b)``. Every new block is orthogonalized against the whole basis
(twice, in float64: "full reorthogonalization"), so no spurious copies of converged eigenvalues
appear. The products :math:`A Q_j` are kept, and the Rayleigh-Ritz step

.. math::
    T = Q^\top (A Q) \;(m \times m),\quad T = Y \Theta Y^\top,\quad U = Q Y,

returns the top ``k`` Ritz pairs :math:`(\theta_i, u_i)` with no extra products. The Ritz values
interlace the eigenvalues from below: :math:`\theta_i \le \lambda_i(A)` (Cauchy), and
:math:`U^\top A U = \operatorname{diag}(\theta)` exactly, whatever their accuracy. With ``m = n``
the basis is complete and the pairs are the exact eigenpairs (up to rounding).

When the Krylov space becomes invariant (e.g. :math:`A` has rank below ``n``), the vanishing
directions of a new block are replaced by random vectors orthogonal to the basis, so the basis
still grows by ``b`` columns a step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ntkgp.progress import progress_bar

__all__ = ["block_lanczos"]

#: a new direction whose norm after orthogonalization is below this fraction of the operator's
#: scale is treated as lying in the basis already (deflated and replaced by a random vector)
_DEFLATION_TOL = 1e-10


def _project_out(block: Tensor, basis: list[Tensor]) -> Tensor:
    """``block - Q (Q^T block)`` against every basis block, twice (classical Gram-Schmidt x2)."""
    for _ in range(2):
        for q in basis:
            block = block - q @ (q.T @ block)
    return block


def _random_orthonormal(
    size: int, count: int, basis: list[Tensor], generator: torch.Generator, device: torch.device
) -> Tensor:
    """``count`` random unit vectors ``(size, count)`` orthogonal to ``basis`` and to each other."""
    fresh = torch.randn(size, count, generator=generator, dtype=torch.float64).to(device)
    fresh = _project_out(fresh, basis)
    q, _ = torch.linalg.qr(fresh)
    return _project_out(q, basis)


def _next_block(
    block: Tensor, basis: list[Tensor], width: int, scale: float, generator: torch.Generator
) -> Tensor:
    r"""An orthonormal ``(n, width)`` block spanning ``block`` minus its part in ``basis``.

    Directions of the orthogonalized ``block`` with singular value below
    ``_DEFLATION_TOL * scale`` are dropped and made up by random orthogonal vectors.
    """
    residual = _project_out(block, basis)
    left, sing, _ = torch.linalg.svd(residual, full_matrices=False)
    kept = left[:, sing > _DEFLATION_TOL * max(scale, torch.finfo(torch.float64).tiny)][:, :width]
    kept = _project_out(kept, basis)  # restore orthogonality lost to rounding in the SVD
    missing = width - kept.shape[1]
    if missing > 0:
        kept = torch.cat([kept, _random_orthonormal(block.shape[0], missing, [*basis, kept],
                                                    generator, block.device)], 1)
    return kept


def block_lanczos(
    matmul: Callable[[Tensor], Tensor],
    size: int,
    rank: int,
    *,
    block_size: int,
    num_steps: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""The top ``rank`` Ritz pairs of a symmetric PSD operator from a block Krylov basis.

    Parameters
    ----------
    matmul:
        :math:`V \mapsto A V` for a float64 block ``(size, t)``; returns ``(size, t)``.
    size:
        ``n``, the side of :math:`A`.
    rank:
        ``k``, how many pairs to return (at most the basis size).
    block_size:
        ``b``, the columns of each Krylov block (products per step).
    num_steps:
        ``s``, the number of blocks; the basis has ``m = min(n, s b)`` columns and costs ``m``
        products with :math:`A`.
    generator:
        The CPU generator for the random start block (and for refills after deflation).
    device:
        Where the basis lives.
    progress:
        Show a tqdm bar over the steps.

    Returns
    -------
    eigenvalues:
        Ritz values :math:`\theta` ``(k,)``, float64, descending.
    eigenvectors:
        Orthonormal Ritz vectors :math:`U` ``(n, k)``, float64.
    """
    basis_size = min(size, num_steps * block_size)
    if not 1 <= rank <= basis_size:
        raise ValueError(f"rank must be between 1 and the basis size {basis_size}, got {rank}")
    device = torch.device(device)
    start = torch.randn(size, min(block_size, basis_size), generator=generator, dtype=torch.float64).to(device)
    basis: list[Tensor] = [torch.linalg.qr(start)[0]]
    products: list[Tensor] = []
    scale = 0.0
    steps = range(-(-basis_size // block_size))
    for _ in progress_bar(steps, desc="Lanczos", enable=progress):
        product = matmul(basis[-1]).to(torch.float64)  # shape: (n, b)
        products.append(product)
        scale = max(scale, float(product.norm(dim=0).max()))
        width = min(block_size, basis_size - sum(q.shape[1] for q in basis))
        if width > 0:
            basis.append(_next_block(product, basis, width, scale, generator))
    q, aq = torch.cat(basis, 1), torch.cat(products, 1)  # shape: (n, m) each
    projected = q.T @ aq
    projected = 0.5 * (projected + projected.T)  # shape: (m, m), block tridiagonal up to rounding
    values, vectors = torch.linalg.eigh(projected)
    top = torch.argsort(values, descending=True)[:rank]
    return values[top], q @ vectors[:, top]
