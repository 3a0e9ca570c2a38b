r"""Posteriors whose covariance is the prior NTK minus (and plus) low-rank terms in the cross-kernel."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK, kernel_matmul
from ntkgp.posteriors.base import Posterior
from ntkgp.posteriors.prior_kernel import PriorKernel

__all__ = ["DowndatePosterior"]


class DowndatePosterior(Posterior):
    r"""A posterior with covariance :math:`K_{**} - V^\top V + U^\top U`.

    Subclasses give :meth:`downdate` (:math:`V`) and optionally :meth:`update` (:math:`U`, for
    differences of two projections such as the inducing posterior's
    :math:`K_{*Z}(K_{ZZ}^{-1} - D^{-1})K_{Z*}`); ``reference`` names the inputs they need the
    cross-kernel against (``None`` when they need none).

    Parameters
    ----------
    ntk, weights:
        As for every :class:`~ntkgp.posteriors.base.Posterior`.
    delta:
        Prior precisions ``(G,)`` (for :math:`K_{**}`).
    reference:
        Inputs of the cross-kernel, or ``None``.
    rank:
        Rows of :math:`V` plus rows of :math:`U` (for sizing test blocks).
    prior_residual:
        ``False``: the covariance is :math:`U^\top U` alone, without :math:`K_{**} - V^\top V`.
    """

    def __init__(
        self,
        ntk: EmpiricalNTK,
        weights: Tensor,
        delta: Tensor,
        reference: Inputs | None,
        rank: int,
        *,
        prior_residual: bool = True,
    ) -> None:
        super().__init__(ntk, weights)
        self.delta = delta
        self.kernel = PriorKernel(ntk, delta, reference)
        self.rank = rank
        self.prior_residual = prior_residual
        #: what the batched route of a plain MLP keeps between calls
        #: (:class:`~ntkgp.posteriors.dense_groups.DenseGroups`), made on first use
        self.dense_groups: Any = None

    @abstractmethod
    def downdate(self, x: Inputs, cross: Tensor | None) -> Tensor:
        """:math:`V` ``(r, n*C)`` for test inputs ``x``, given the cross-kernel."""

    def update(self, x: Inputs, cross: Tensor | None) -> Tensor | None:
        """:math:`U` ``(r', n*C)``, added back; ``None`` (the default) for none."""
        return None

    def _terms(self, x: Inputs, cross: Tensor | None) -> list[tuple[float, Tensor]]:
        """The signed low-rank terms: ``(-1, V)`` (unless ``prior_residual`` is off) and ``(+1, U)``."""
        terms = [(-1.0, self.downdate(x, cross))] if self.prior_residual else []
        up = self.update(x, cross)
        if up is not None:
            terms.append((1.0, up))
        return terms

    def _parts(self, x: Inputs, full: bool) -> tuple[Tensor, list[tuple[float, Tensor]]]:
        prior, cross = self.kernel.parts(x, full, prior=self.prior_residual)  # zeros without the residual
        return prior, self._terms(x, cross)

    def _covariance(self, x: Inputs) -> Tensor:
        prior, terms = self._parts(x, full=True)
        for sign, v in terms:
            prior = prior + sign * (v.T @ v)
        return prior

    def _covariance_blocks(self, x: Inputs) -> Tensor:
        C = self.ntk.num_outputs
        parts = []
        rows = self.kernel.rows(self.rank, streamed=self.kernel.streams(x))
        for _, xb in self.network.chunks(x, rows, desc="predictive blocks"):
            prior, terms = self._parts(xb, full=False)
            for sign, v in terms:
                v = v.reshape(v.shape[0], xb.num, C)
                prior = prior + sign * torch.einsum("mnc,mnd->ncd", v, v)
            parts.append(prior)
        return torch.cat(parts)

    def prior_matmul(self, x: Inputs, rhs: Tensor) -> Tensor:
        """:math:`K_{**}\\,\\text{rhs}` for ``rhs`` ``(n*C, t)``, float64, lazily."""
        C = self.ntk.num_outputs
        cols = rhs.T.reshape(rhs.shape[1], x.num, C)
        out = kernel_matmul(self.ntk, x, x, self.delta.to(torch.float64).reciprocal(), cols)
        return out.reshape(out.shape[0], -1).T.to(torch.float64)

    def _covariance_matmul(self, x: Inputs, rhs: Tensor) -> Tensor:
        rhs = rhs.to(torch.float64)
        out = self.prior_matmul(x, rhs) if self.prior_residual else torch.zeros_like(rhs)
        # V and U are (r, n*C): kept whole (r per test output, like the result)
        blocks: list[list[tuple[float, Tensor]]] = []
        rows = self.kernel.rows(self.rank, streamed=self.kernel.streams(x))
        for _, xb in self.network.chunks(x, rows, desc="predictive matmul"):
            blocks.append(self._terms(xb, self.kernel.parts(xb, full=False, prior=False)[1]))
        for term in range(len(blocks[0]) if blocks else 0):
            sign = blocks[0][term][0]
            v = torch.cat([b[term][1] for b in blocks], dim=1)
            out = out + sign * (v.T @ (v @ rhs))
        return out
