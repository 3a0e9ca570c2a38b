r"""The exact weight-space posterior (the GLM predictive): :math:`J_* A^{-1} J_*^\top`."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.factor import AnyFactor, dense_factor, factor_solve, lower_solve, upper_solve
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK, jacobian, pullback, pushforward
from ntkgp.ntk.captures import held_captures
from ntkgp.posteriors.base import Posterior
from ntkgp.structured.capture import UnitCapture

__all__ = ["WeightSpacePosterior"]


class WeightSpacePosterior(Posterior):
    r"""Predictive covariance :math:`J_* A^{-1} J_*^\top`, :math:`A = P_0 + J^\top S^{-1} J` (or the GGN).

    Every use of the precision goes through its factor :math:`T`, :math:`A = TT^\top`
    (:mod:`ntkgp.linalg.factor`): :meth:`whiten` gives :math:`V = T^{-1}J_*^\top`, whose
    :math:`V^\top V` is the covariance, and :meth:`draw` the weights :math:`\bar\theta + T^{-\top}z`.

    Parameters
    ----------
    ntk, weights:
        As for every :class:`~ntkgp.posteriors.base.Posterior`.
    factor:
        :math:`T`: the lower Cholesky factor of :math:`A`, ``(P, P)``, or a structured factor
        (:class:`~ntkgp.linalg.woodbury.WoodburyFactor` after points were added).
    """

    def __init__(self, ntk: EmpiricalNTK, factor: AnyFactor, weights: Tensor) -> None:
        super().__init__(ntk, weights)
        #: the factor :math:`T` of the posterior precision
        self.factor = factor

    @property
    def cholesky_factor(self) -> Tensor:
        """The lower Cholesky factor of :math:`A` as one ``(P, P)`` tensor (a structured factor's is computed on
        first access, :func:`~ntkgp.linalg.factor.dense_factor`)."""
        return dense_factor(self.factor)

    def whiten(self, columns: Tensor) -> Tensor:
        r""":math:`V = T^{-1}\,\text{columns}` for ``columns`` ``(P, t)`` (e.g. :math:`J_*^\top`):
        :math:`V^\top V = \text{columns}^\top A^{-1}\,\text{columns}`. Differentiable in ``columns``."""
        return lower_solve(self.factor, columns)

    def draw(self, z: Tensor) -> Tensor:
        r"""Weights :math:`\bar\theta + T^{-\top}z` ``(S, P)`` for standard normal ``z`` ``(P, S)``: draws from
        :math:`\mathcal N(\bar\theta, A^{-1})`."""
        return self.weights + upper_solve(self.factor, z).T

    def _solved_jacobian(self, x: Inputs, captured: list[UnitCapture] | None = None) -> Tensor:
        # shape: x (n examples) -> V = T^{-1} J_*^T, (P, n*C)
        size = self.network.chunk_size()  # one chunk: x itself (its captures may be cached by the mean)
        if captured is None:
            captured = held_captures(self.ntk, x)
        chunks = [
            jacobian(self.ntk, xc, captured=None if captured is None else [c[s : s + xc.num] for c in captured])
            for s, xc in x.chunks(size)
        ]
        jac = torch.cat(chunks).reshape(-1, self.network.num_parameters).to(torch.float64)
        return self.whiten(jac.T)

    def _covariance(self, x: Inputs) -> Tensor:
        v = self._solved_jacobian(x)
        return v.T @ v

    def _covariance_blocks(self, x: Inputs) -> Tensor:
        C = self.ntk.num_outputs
        parts = []
        whole = held_captures(self.ntk, x)  # e.g. kept by the mean at x
        for s, xb in self.network.chunks(x, self.rows_per_block(self.network.num_parameters), desc="predictive"):
            captured = None if whole is None else [c[s : s + xb.num] for c in whole]
            v = self._solved_jacobian(xb, captured).reshape(-1, xb.num, C)  # shape: (P, n, C)
            parts.append(torch.einsum("pnc,pnd->ncd", v, v))
        return torch.cat(parts)

    def _covariance_matmul(self, x: Inputs, rhs: Tensor) -> Tensor:
        C = self.ntk.num_outputs
        pulled = pullback(self.ntk, x, rhs.T.reshape(rhs.shape[1], x.num, C))  # shape: (t, P)
        inner = factor_solve(self.factor, pulled.T)  # shape: (P, t)
        out = pushforward(self.ntk, x, inner.T)  # shape: (t, n, C)
        return out.reshape(out.shape[0], -1).T.to(torch.float64)
