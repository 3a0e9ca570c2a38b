r"""The exact kernel-space posterior: :math:`K_{**} - K_{*X}(K + S)^{-1}K_{X*}` by the cached Cholesky factor."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.cholesky import cholesky_solve
from ntkgp.linalg.hessian_root import apply_root_transpose
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import NTKProblem, kernel_matmul
from ntkgp.posteriors.downdate import DowndatePosterior

__all__ = ["KernelSpacePosterior"]


class KernelSpacePosterior(DowndatePosterior):
    r"""Predictive covariance :math:`K_{**} - K_{*X} (K + S)^{-1} K_{X*}` via the cached Cholesky factor.

    For the Laplace GP of a non-Gaussian likelihood, with :math:`\Lambda = BB^\top` per point, it is
    :math:`K_{**} - K_{*X} B (I + B^\top K B)^{-1} B^\top K_{X*}` (same code, with :math:`B^\top`
    applied to :math:`K_{X*}` before the triangular solve): the downdate is
    :math:`V = L^{-1} B^\top K_{X*}`.

    Parameters
    ----------
    problem:
        The training problem.
    delta:
        Prior precisions ``(G,)``.
    cholesky_factor:
        :math:`L`, lower Cholesky factor of :math:`K + S` (or of :math:`I + B^\top K B`).
    weights:
        :math:`\bar\theta`, ``(P,)``.
    hessian_root:
        Laplace: per-point ``B`` ``(N, C, C)``; ``None`` for Gaussian likelihoods.
    """

    def __init__(
        self,
        problem: NTKProblem,
        delta: Tensor,
        cholesky_factor: Tensor,
        weights: Tensor,
        hessian_root: Tensor | None = None,
    ) -> None:
        super().__init__(problem.ntk, weights, delta, problem.x, problem.size)
        self.problem, self.cholesky_factor, self.hessian_root = problem, cholesky_factor, hessian_root

    def downdate(self, x: Inputs, cross: Tensor | None) -> Tensor:
        assert cross is not None
        if self.hessian_root is not None:
            cross = apply_root_transpose(self.hessian_root, cross)
        return torch.linalg.solve_triangular(self.cholesky_factor, cross, upper=False)

    def _covariance_matmul(self, x: Inputs, rhs: Tensor) -> Tensor:
        if self.hessian_root is not None:
            return super()._covariance_matmul(x, rhs)
        rhs = rhs.to(torch.float64)
        ntk, train, C = self.ntk, self.problem.x, self.ntk.num_outputs
        weights = self.delta.to(torch.float64).reciprocal()
        # K_{X*} rhs, then (K + S)^{-1}, then K_{*X}
        cross = kernel_matmul(ntk, train, x, weights, rhs.T.reshape(rhs.shape[1], x.num, C))
        t = cholesky_solve(cross.reshape(cross.shape[0], -1).T.to(torch.float64), self.cholesky_factor)
        back = kernel_matmul(ntk, x, train, weights, t.T.reshape(t.shape[1], train.num, C))
        return self.prior_matmul(x, rhs) - back.reshape(back.shape[0], -1).T.to(torch.float64)
