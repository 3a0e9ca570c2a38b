r"""Products with the block-diagonal root :math:`B` of the likelihood Hessian, :math:`\Lambda = BB^\top`.

For a non-Gaussian likelihood the per-point ``C x C`` blocks :math:`\Lambda_n = B_n B_n^\top` of the
negative log-likelihood Hessian enter every Laplace solver as :math:`B^\top K B`. ``B`` is stored
as its blocks ``(N, C, C)``; rows of the ``(N C, k)`` operands are point-major.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_root", "apply_root_transpose", "sandwich"]


def apply_root(hessian_root: Tensor, rows: Tensor) -> Tensor:
    r""":math:`B R` for ``R`` ``(N C, k)``."""
    n, c, _ = hessian_root.shape
    out = torch.einsum("nca,nak->nck", hessian_root.to(rows.dtype), rows.reshape(n, c, -1))
    return out.reshape(n * c, -1)


def apply_root_transpose(hessian_root: Tensor, rows: Tensor) -> Tensor:
    r""":math:`B^\top R` for ``R`` ``(N C, k)``."""
    n, c, _ = hessian_root.shape
    out = torch.einsum("nca,nck->nak", hessian_root.to(rows.dtype), rows.reshape(n, c, -1))
    return out.reshape(n * c, -1)


def sandwich(hessian_root: Tensor, matrix: Tensor) -> Tensor:
    r""":math:`B^\top M B` for a square ``M`` ``(N C, N C)``."""
    left = apply_root_transpose(hessian_root, matrix)
    return apply_root_transpose(hessian_root, left.T.contiguous()).T
