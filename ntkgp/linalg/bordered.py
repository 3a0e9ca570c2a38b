r"""A Cholesky factor grown by bordering, kept in blocks: adding rows never copies the factor.

When ``k`` rows and columns are appended to an SPD matrix :math:`A = LL^\top`,

.. math::
    \begin{pmatrix} A & B\\ B^\top & D\end{pmatrix}
    = \begin{pmatrix} L & 0\\ L_{21} & L_{22}\end{pmatrix}
      \begin{pmatrix} L & 0\\ L_{21} & L_{22}\end{pmatrix}^\top,\qquad
    L_{21} = (L^{-1}B)^\top,\quad L_{22}L_{22}^\top = D - L_{21}L_{21}^\top .

:class:`BorderedCholesky` stores :math:`L` (a tensor or another bordered factor), :math:`L_{21}`
``(k, M)`` and :math:`L_{22}` ``(k, k)``: an extension costs one triangular solve with ``k``
right-hand sides (:math:`M^2 k` flops) and no :math:`M^2` copy, which at ``M = 2000`` costs more
than the solve itself on a memory-bound CPU. Solves run block by block (the
interface of :mod:`ntkgp.linalg.factor`); the dense factor is assembled only when asked for (and
kept). Chains deeper than :data:`MAX_DEPTH` are collapsed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.cholesky import cholesky
from ntkgp.linalg.factor import factor_logdet, lower_solve, upper_solve

__all__ = ["MAX_DEPTH", "BorderedCholesky"]

#: bordered levels kept before the factor is assembled into one tensor
MAX_DEPTH = 8


class BorderedCholesky:
    r"""The lower factor :math:`\begin{pmatrix} L & 0\\ L_{21} & L_{22}\end{pmatrix}`, by blocks.

    Parameters
    ----------
    base:
        :math:`L`, ``(M, M)``: a tensor or a :class:`BorderedCholesky`.
    border:
        :math:`L_{21}`, ``(k, M)``.
    corner:
        :math:`L_{22}`, ``(k, k)``, lower triangular.
    """

    def __init__(self, base: Tensor | BorderedCholesky, border: Tensor, corner: Tensor) -> None:
        self.base, self.border, self.corner = base, border, corner
        self.depth: int = 1 + (base.depth if isinstance(base, BorderedCholesky) else 0)
        self._dense: Tensor | None = None

    @classmethod
    def extend(cls, base: Tensor | BorderedCholesky, cross: Tensor, block: Tensor, *, what: str) -> BorderedCholesky:
        r"""The factor of :math:`\begin{pmatrix} A & B\\ B^\top & D\end{pmatrix}` from ``base`` (of ``A``),
        ``cross`` :math:`B` ``(M, k)`` and ``block`` :math:`D` ``(k, k)``."""
        if isinstance(base, BorderedCholesky) and base.depth >= MAX_DEPTH:
            base = base.dense()
        border = lower_solve(base, cross).mT  # shape: (k, M)
        corner = cholesky(block - border @ border.mT, what=what)
        return cls(base, border, corner)

    @property
    def base_size(self) -> int:
        return self.border.shape[1]

    @property
    def shape(self) -> torch.Size:
        n = self.base_size + self.corner.shape[0]
        return torch.Size((n, n))

    @property
    def dtype(self) -> torch.dtype:
        return self.corner.dtype

    @property
    def device(self) -> torch.device:
        return self.corner.device

    def solve_lower(self, rhs: Tensor) -> Tensor:
        r""":math:`L'^{-1}\,\text{rhs}` for ``rhs`` ``(M + k, t)``."""
        return self.solve_lower_from(lower_solve(self.base, rhs[: self.base_size]), rhs)

    def solve_lower_from(self, top: Tensor, rhs: Tensor) -> Tensor:
        r""":math:`L'^{-1}\,\text{rhs}` given its first ``M`` rows, ``top`` :math:`= L^{-1}\,\text{rhs}_{:M}`: the
        forward substitution of the last ``k`` rows only (:math:`kMt` flops instead of :math:`M^2 t`)."""
        m = self.base_size
        bottom = torch.linalg.solve_triangular(self.corner, rhs[m:] - self.border @ top, upper=False)
        return torch.cat([top, bottom])

    def solve_upper(self, rhs: Tensor) -> Tensor:
        r""":math:`L'^{-\top}\,\text{rhs}` for ``rhs`` ``(M + k, t)``."""
        m = self.base_size
        bottom = torch.linalg.solve_triangular(self.corner.mT, rhs[m:], upper=True)
        top = upper_solve(self.base, rhs[:m] - self.border.mT @ bottom)
        return torch.cat([top, bottom])

    def logdet(self) -> Tensor:
        r""":math:`\log|L'L'^\top|`."""
        return factor_logdet(self.base) + 2.0 * self.corner.diagonal().log().sum()

    def dense(self) -> Tensor:
        """The factor as one ``(M + k, M + k)`` tensor (assembled once, then kept)."""
        if self._dense is None:
            base = self.base.dense() if isinstance(self.base, BorderedCholesky) else self.base
            m, k = self.base_size, self.corner.shape[0]
            out = base.new_zeros(m + k, m + k)
            out[:m, :m] = base
            out[m:, :m] = self.border
            out[m:, m:] = self.corner
            self._dense = out
        return self._dense
