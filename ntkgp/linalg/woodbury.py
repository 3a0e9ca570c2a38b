r"""A Cholesky factor with a low-rank term kept apart (Woodbury form): adding rank never touches the factor.

When a rank-``k`` term is added to an SPD matrix :math:`A = LL^\top`,

.. math::
    A' = LL^\top + UU^\top = L\,(I + WW^\top)\,L^\top,\qquad W = L^{-1}U\quad (P \times k).

With the eigendecomposition of the small Gram :math:`W^\top W = V\operatorname{diag}(\mu)V^\top` ``(k, k)``,
the symmetric root of the inner matrix's inverse is

.. math::
    S = (I + WW^\top)^{-1/2} = I + W\,V\operatorname{diag}(g)\,V^\top W^\top,\qquad
    g_i = \frac{(1+\mu_i)^{-1/2} - 1}{\mu_i} = \frac{-1}{\sqrt{1+\mu_i}\,(1 + \sqrt{1+\mu_i})}

(:math:`WW^\top` has the eigenpairs :math:`(\mu_i, Wv_i/\sqrt{\mu_i})` and zeros elsewhere; the second form
of :math:`g_i` has no cancellation and is finite at :math:`\mu_i = 0`). :class:`WoodburyFactor` is the
square root :math:`T = L S^{-1}` of :math:`A'` (:math:`TT^\top = A'`, not triangular), in the interface
of :mod:`ntkgp.linalg.factor`:

.. math::
    T^{-1}b = S\,L^{-1}b,\qquad T^{-\top}b = L^{-\top}S\,b,\qquad
    \log|A'| = \log|A| + \textstyle\sum_i \log(1 + \mu_i),

so :math:`A'^{-1}b = L^{-\top}(I + WW^\top)^{-1}L^{-1}b`, with
:math:`(I + WW^\top)^{-1} = I - W(I + W^\top W)^{-1}W^\top` (Woodbury), and
:math:`b^\top A'^{-1}b = |S L^{-1}b|^2`, a sum of squares (a difference of two squares,
:math:`|L^{-1}b|^2 - |R^{-1}W^\top L^{-1}b|^2` with :math:`RR^\top = I + W^\top W`, loses relative accuracy
:math:`\epsilon\mu` where this loses :math:`\epsilon\sqrt\mu`). An update costs one triangular solve
with ``k`` right-hand sides (:math:`P^2 k` flops), :math:`Pk^2` for the Gram and a ``k x k``
eigendecomposition; nothing ``P x P`` is allocated. Each solve costs :math:`4Pk` flops more than with
:math:`L` alone.

Further updates stack their columns: :math:`W \leftarrow [W,\ L^{-1}U_2]`. Past :data:`MAX_RANK`
columns the term is folded into a dense factor (:meth:`WoodburyFactor.dense`, by
:func:`~ntkgp.linalg.cholesky_update.cholesky_update`) that the next columns are kept apart from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.cholesky_update import cholesky_update

__all__ = ["MAX_RANK", "WoodburyFactor"]

#: columns kept in Woodbury form before they are folded into a dense factor
MAX_RANK = 64


class WoodburyFactor:
    r"""The square root :math:`T = L(I + WW^\top)^{1/2}` of :math:`A' = LL^\top + UU^\top` (module docstring).

    Parameters
    ----------
    base:
        :math:`L`, lower Cholesky factor of :math:`A`, ``(P, P)`` (kept, never modified).
    update:
        :math:`U`, ``(P, k)``.
    solved:
        :math:`W = L^{-1}U`, ``(P, k)``.
    gram:
        :math:`W^\top W` ``(k, k)`` when the caller has it (else computed).
    """

    def __init__(self, base: Tensor, update: Tensor, solved: Tensor, gram: Tensor | None = None) -> None:
        self.base, self.update, self.solved = base, update, solved
        #: :math:`W^\top W`, ``(k, k)``
        self.gram = solved.mT @ solved if gram is None else gram
        values, vectors = torch.linalg.eigh(self.gram)
        values = values.clamp_min(0.0)  # shape: (k,)
        root = (1.0 + values).sqrt()
        #: :math:`\sum_i \log(1 + \mu_i) = \log|I + W^\top W|`
        self.inner_logdet = torch.log1p(values).sum()
        #: :math:`V\operatorname{diag}(g)V^\top`, ``(k, k)``: :math:`S = I + W G W^\top`
        self.inner = (vectors * (-1.0 / (root * (1.0 + root)))) @ vectors.mT
        self._dense: Tensor | None = None

    @classmethod
    def extend(cls, base: Tensor | WoodburyFactor, update: Tensor) -> WoodburyFactor:
        r"""The factor of :math:`TT^\top + UU^\top` for ``base`` :math:`T` (a dense lower Cholesky factor or a
        :class:`WoodburyFactor`) and ``update`` :math:`U` ``(P, k)``: ``base``'s columns and the new ones."""
        if isinstance(base, WoodburyFactor) and base.rank + update.shape[1] > MAX_RANK:
            base = base.dense()  # fold the old columns in; the new ones start a term of their own
        if not isinstance(base, WoodburyFactor):
            return cls(base, update, torch.linalg.solve_triangular(base, update, upper=False))
        new = torch.linalg.solve_triangular(base.base, update, upper=False)  # shape: (P, k_new)
        cross = base.solved.mT @ new  # shape: (k, k_new)
        gram = torch.cat([torch.cat([base.gram, cross], 1), torch.cat([cross.mT, new.mT @ new], 1)])
        columns = torch.cat([base.update, update], 1)
        return cls(base.base, columns, torch.cat([base.solved, new], 1), gram)

    @property
    def rank(self) -> int:
        """Columns ``k`` of the low-rank term."""
        return self.update.shape[1]

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def _inner_root(self, rhs: Tensor) -> Tensor:
        r""":math:`S\,\text{rhs} = \text{rhs} + W G W^\top \text{rhs}`."""
        w = self.solved.to(rhs.dtype)
        return rhs + w @ (self.inner.to(rhs.dtype) @ (w.mT @ rhs))

    def solve_lower(self, rhs: Tensor) -> Tensor:
        r""":math:`T^{-1}\,\text{rhs} = S L^{-1}\,\text{rhs}` for ``rhs`` ``(P, t)``."""
        return self._inner_root(torch.linalg.solve_triangular(self.base, rhs, upper=False))

    def solve_upper(self, rhs: Tensor) -> Tensor:
        r""":math:`T^{-\top}\,\text{rhs} = L^{-\top} S\,\text{rhs}` for ``rhs`` ``(P, t)``."""
        return torch.linalg.solve_triangular(self.base.mT, self._inner_root(rhs), upper=True)

    def logdet(self) -> Tensor:
        r""":math:`\log|A'| = \log|A| + \log|I + W^\top W|`."""
        return 2.0 * self.base.diagonal().log().sum() + self.inner_logdet

    def dense(self) -> Tensor:
        r"""The lower Cholesky factor of :math:`A'`, ``(P, P)``: a rank-``k`` update of :math:`L`
        (:func:`~ntkgp.linalg.cholesky_update.cholesky_update`), computed on first call and kept."""
        if self._dense is None:
            self._dense = cholesky_update(self.base, self.update)
        return self._dense
