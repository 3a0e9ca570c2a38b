r"""Square roots of SPD matrices that solve: one interface for a dense Cholesky factor and the structured ones.

A factor is any :math:`T` with :math:`A = TT^\top` that solves with :math:`T` and :math:`T^\top`:

* a dense lower Cholesky factor, a ``(n, n)`` tensor;
* :class:`~ntkgp.linalg.bordered.BorderedCholesky` (rows and columns appended to :math:`A`, kept in blocks);
* :class:`~ntkgp.linalg.woodbury.WoodburyFactor` (a low-rank term added to :math:`A`, kept apart).

Consumers take them through the functions here (:func:`lower_solve`, :func:`upper_solve`,
:func:`factor_solve`, :func:`factor_logdet`, :func:`dense_factor`), never through their storage, so
every quantity computed from a factor is one of :math:`T^{-1}B`, :math:`T^{-\top}B`,
:math:`A^{-1}B = T^{-\top}T^{-1}B` and :math:`\log|A|`. With :math:`V = T^{-1}B`,
:math:`B^\top A^{-1} B = V^\top V` for every factor; :math:`\theta + T^{-\top}z`, :math:`z \sim \mathcal N(0, I)`,
is a draw from :math:`\mathcal N(\theta, A^{-1})`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["AnyFactor", "Factor", "dense_factor", "factor_logdet", "factor_solve", "lower_solve", "upper_solve"]


@runtime_checkable
class Factor(Protocol):
    r"""A structured square root :math:`T` of an SPD matrix :math:`A = TT^\top`, ``(n, n)``."""

    @property
    def shape(self) -> torch.Size: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def solve_lower(self, rhs: Tensor) -> Tensor:
        r""":math:`T^{-1}\,\text{rhs}` for ``rhs`` ``(n, t)``, differentiable in ``rhs``."""
        ...

    def solve_upper(self, rhs: Tensor) -> Tensor:
        r""":math:`T^{-\top}\,\text{rhs}` for ``rhs`` ``(n, t)``, differentiable in ``rhs``."""
        ...

    def logdet(self) -> Tensor:
        r""":math:`\log|A|`."""
        ...

    def dense(self) -> Tensor:
        """The lower Cholesky factor of :math:`A` as one ``(n, n)`` tensor (assembled on first call, then kept)."""
        ...


#: a dense lower Cholesky factor or a structured :class:`Factor`
AnyFactor = Tensor | Factor


def lower_solve(factor: AnyFactor, rhs: Tensor) -> Tensor:
    r""":math:`T^{-1}\,\text{rhs}` for ``rhs`` ``(n, t)``."""
    if isinstance(factor, Tensor):
        return torch.linalg.solve_triangular(factor, rhs, upper=False)
    return factor.solve_lower(rhs)


def upper_solve(factor: AnyFactor, rhs: Tensor) -> Tensor:
    r""":math:`T^{-\top}\,\text{rhs}` for ``rhs`` ``(n, t)``."""
    if isinstance(factor, Tensor):
        return torch.linalg.solve_triangular(factor.mT, rhs, upper=True)
    return factor.solve_upper(rhs)


def factor_solve(factor: AnyFactor, rhs: Tensor) -> Tensor:
    r""":math:`A^{-1}\,\text{rhs} = T^{-\top}T^{-1}\,\text{rhs}` for ``rhs`` ``(n, t)``."""
    return upper_solve(factor, lower_solve(factor, rhs))


def factor_logdet(factor: AnyFactor) -> Tensor:
    r""":math:`\log|A|`."""
    if isinstance(factor, Tensor):
        return 2.0 * factor.diagonal().log().sum()
    return factor.logdet()


def dense_factor(factor: AnyFactor) -> Tensor:
    r"""The lower Cholesky factor of :math:`A` as one tensor (a structured factor's is assembled on first call)."""
    return factor if isinstance(factor, Tensor) else factor.dense()
