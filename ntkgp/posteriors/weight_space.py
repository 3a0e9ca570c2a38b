r"""The exact weight-space posterior (the GLM predictive): :math:`J_* A^{-1} J_*^\top`."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.cholesky import cholesky_solve
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK, jacobian, pullback, pushforward
from ntkgp.posteriors.base import Posterior

__all__ = ["WeightSpacePosterior"]


class WeightSpacePosterior(Posterior):
    r"""Predictive covariance :math:`J_* A^{-1} J_*^\top`, :math:`A = P_0 + J^\top S^{-1} J` (or the GGN).

    Parameters
    ----------
    ntk, weights:
        As for every :class:`~ntkgp.posteriors.base.Posterior`.
    cholesky_factor:
        :math:`L`, lower Cholesky factor of :math:`A`, ``(P, P)``.
    """

    def __init__(self, ntk: EmpiricalNTK, cholesky_factor: Tensor, weights: Tensor) -> None:
        super().__init__(ntk, weights)
        self.cholesky_factor = cholesky_factor

    def _solved_jacobian(self, x: Inputs) -> Tensor:
        # shape: x (n examples) -> V = L^{-1} J_*^T, (P, n*C)
        chunks = [jacobian(self.ntk, xc) for _, xc in x.chunks(self.network.chunk_size())]
        jac = torch.cat(chunks).reshape(-1, self.network.num_parameters).to(torch.float64)
        return torch.linalg.solve_triangular(self.cholesky_factor, jac.T, upper=False)

    def _covariance(self, x: Inputs) -> Tensor:
        v = self._solved_jacobian(x)
        return v.T @ v

    def _covariance_blocks(self, x: Inputs) -> Tensor:
        C = self.ntk.num_outputs
        parts = []
        for _, xb in self.network.chunks(x, self.rows_per_block(self.network.num_parameters), desc="predictive"):
            v = self._solved_jacobian(xb).reshape(-1, xb.num, C)  # shape: (P, n, C)
            parts.append(torch.einsum("pnc,pnd->ncd", v, v))
        return torch.cat(parts)

    def _covariance_matmul(self, x: Inputs, rhs: Tensor) -> Tensor:
        C = self.ntk.num_outputs
        pulled = pullback(self.ntk, x, rhs.T.reshape(rhs.shape[1], x.num, C))  # shape: (t, P)
        inner = cholesky_solve(pulled.T, self.cholesky_factor)  # shape: (P, t)
        out = pushforward(self.ntk, x, inner.T)  # shape: (t, n, C)
        return out.reshape(out.shape[0], -1).T.to(torch.float64)
