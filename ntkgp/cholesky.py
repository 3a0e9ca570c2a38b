"""Cholesky factorization that reports, rather than hides, numerical trouble."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["NotPositiveDefiniteError", "cholesky", "cholesky_logdet", "cholesky_solve"]


class NotPositiveDefiniteError(RuntimeError):
    """The matrix to factor is not numerically positive definite."""


def cholesky(matrix: Tensor, *, what: str, max_tries: int = 3) -> Tensor:
    """Lower Cholesky factor of a symmetric positive-definite ``matrix`` ``(M, M)``.

    The factorization is exact when it succeeds on the first try. Only if it fails is a
    jitter of ``1e-10``, ``1e-9``, ... times the mean diagonal added, with a warning naming the
    jitter; after ``max_tries`` failures :class:`NotPositiveDefiniteError` is raised.
    Differentiable (``torch.linalg.cholesky``).
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if not info.any():
        return factor
    if not torch.isfinite(matrix).all():
        raise NotPositiveDefiniteError(f"{what} has NaN or infinite entries")
    scale = matrix.diagonal(dim1=-2, dim2=-1).mean().detach().abs()
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for attempt in range(max_tries):
        jitter = scale * 10.0 ** (-10 + attempt)
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * eye)
        if not info.any():
            warnings.warn(
                f"{what} was not numerically positive definite; added jitter {jitter.item():.3g} "
                "to its diagonal (a larger noise or prior precision avoids this).",
                stacklevel=3,
            )
            return factor
    raise NotPositiveDefiniteError(
        f"{what} is not positive definite even with jitter {jitter.item():.3g}; the noise or "
        "prior precision is likely too small, or the kernel has NaNs"
    )


def cholesky_solve(rhs: Tensor, factor: Tensor) -> Tensor:
    r""":math:`(LL^\top)^{-1} B` from the lower factor ``L`` ``(M, M)`` and ``B`` ``(M, k)``: two triangular solves.

    Same result as :func:`torch.cholesky_solve`, which on CPU copies the factor into LAPACK's
    column-major layout on every call: for M = 4000 it took 55 ms for one right-hand side, where
    the two ``solve_triangular`` calls take 6 ms. Differentiable.
    """
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


class _CholeskyLogDet(torch.autograd.Function):
    """:math:`\\log|A|` through a Cholesky factor, with the gradient :math:`A^{-1}` from the factor."""

    @staticmethod
    def forward(ctx: Any, matrix: Tensor, what: str) -> Tensor:  # type: ignore[override]
        factor = cholesky(matrix, what=what)
        ctx.save_for_backward(factor)
        return 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (factor,) = ctx.saved_tensors
        return grad[..., None, None] * torch.cholesky_inverse(factor), None


def cholesky_logdet(matrix: Tensor, *, what: str) -> Tensor:
    r""":math:`\log|A|` of a symmetric positive-definite ``matrix`` ``(M, M)`` via :func:`cholesky`.

    Differentiable with the gradient :math:`A^{-1}` (``torch.cholesky_inverse`` of the factor):
    about 5x cheaper than differentiating through ``torch.linalg.cholesky``, whose backward
    serves any function of the factor (M = 500: 17 ms against 3 ms per backward, one thread).
    Not twice differentiable.
    """
    return _CholeskyLogDet.apply(matrix, what)
