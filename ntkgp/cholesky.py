"""Cholesky factorization that reports, rather than hides, numerical trouble."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["NotPositiveDefiniteError", "cholesky"]


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
