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

__all__ = ["block_lanczos", "krylov_basis"]

#: a new direction whose norm after orthogonalization is below this fraction of the operator's
#: scale is treated as lying in the basis already (deflated and replaced by a random vector)
_DEFLATION_TOL = 1e-10


def _project_out(block: Tensor, rows: Tensor) -> Tensor:
    """``block - Q (Q^T block)`` for the basis ``Q`` given by its rows ``Q^T`` ``(j, n)`` (contiguous),
    twice (classical Gram-Schmidt x2)."""
    for _ in range(2):
        block = block - rows.T @ (rows @ block)
    return block


def _random_orthonormal(size: int, count: int, rows: Tensor, generator: torch.Generator | None) -> Tensor:
    """``count`` random unit vectors ``(size, count)`` orthogonal to the basis ``rows`` and to each other."""
    fresh = torch.randn(size, count, generator=generator, dtype=torch.float64).to(rows.device)
    q, _ = torch.linalg.qr(_project_out(fresh, rows))
    return _project_out(q, rows)


def _next_block(block: Tensor, rows: Tensor, width: int, scale: float, generator: torch.Generator | None) -> Tensor:
    r"""An orthonormal ``(n, width)`` block spanning ``block`` minus its part in the basis ``rows``.

    Directions of the orthogonalized ``block`` with singular value below
    ``_DEFLATION_TOL * scale`` are dropped and made up by random orthogonal vectors.
    """
    residual = _project_out(block, rows)
    tol = _DEFLATION_TOL * max(scale, torch.finfo(torch.float64).tiny)
    if residual.shape[1] == 1:  # one column (plain Lanczos): normalize, no SVD or re-projection
        norm = float(residual.norm())
        kept = residual[:, :width] / norm if norm > tol else residual[:, :0]
    else:
        left, sing, _ = torch.linalg.svd(residual, full_matrices=False)
        kept = _project_out(left[:, sing > tol][:, :width], rows)  # orthogonality lost to rounding in the SVD
    missing = width - kept.shape[1]
    if missing > 0:
        kept = torch.cat([kept, _random_orthonormal(block.shape[0], missing, torch.cat([rows, kept.T]), generator)], 1)
    return kept


def krylov_basis(
    matmul: Callable[[Tensor], Tensor],
    start: Tensor,
    basis_size: int,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "Lanczos",
) -> tuple[Tensor, Tensor]:
    r"""An orthonormal basis :math:`Q` of the block Krylov space of ``start``, and :math:`T = Q^\top A Q`.

    Each new block is orthogonalized twice against the whole basis, which is kept as rows
    (:math:`Q^\top`, contiguous) so that every projection is two plain GEMMs. The products
    :math:`AQ` are kept, so :math:`T` (block tridiagonal up to rounding) needs no extra product
    and holds to rounding whatever the loss of orthogonality in plain Lanczos.

    Parameters
    ----------
    matmul:
        :math:`V \mapsto A V` for a float64 block ``(n, t)``; returns ``(n, t)``.
    start:
        The start block ``(n, b)``; ``b`` is the block width. Its vanishing directions (a zero
        start vector, say) are replaced by random ones.
    basis_size:
        ``m``, the columns of :math:`Q` (at most ``n``); it costs ``m`` products with :math:`A`.
    generator:
        For random refills after deflation.
    progress, desc:
        A tqdm bar over the steps, and its label.

    Returns
    -------
    (Q, T)
        ``(n, m)`` with :math:`Q^\top Q = I` to rounding, and ``(m, m)`` symmetric; float64.
    """
    start = start.to(torch.float64)
    n, width = start.shape
    m = min(n, basis_size)
    qt = torch.zeros(m, n, dtype=torch.float64, device=start.device)  # shape: (m, n), the basis as rows
    aqt = torch.zeros_like(qt)
    first = _next_block(start, qt[:0], min(width, m), float(start.norm(dim=0).max()) if n else 0.0, generator)
    filled, done, scale = first.shape[1], 0, 0.0
    qt[:filled] = first.T
    for _ in progress_bar(range(-(-m // width)), desc=desc, enable=progress):
        product = matmul(qt[done:filled].T.contiguous()).to(torch.float64)  # shape: (n, b)
        aqt[done:filled] = product.T
        scale = max(scale, float(product.norm(dim=0).max()))
        done = filled
        step = min(width, m - filled)
        if step == 0:
            break
        qt[filled : filled + step] = _next_block(product, qt[:filled], step, scale, generator).T
        filled += step
    projected = qt @ aqt.T  # shape: (m, m)
    return qt.T.contiguous(), 0.5 * (projected + projected.T)


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
    start = torch.randn(size, min(block_size, basis_size), generator=generator, dtype=torch.float64)
    q, projected = krylov_basis(
        matmul, start.to(torch.device(device)), basis_size, generator=generator, progress=progress
    )
    values, vectors = torch.linalg.eigh(projected)
    top = torch.argsort(values, descending=True)[:rank]
    return values[top], q @ vectors[:, top]
