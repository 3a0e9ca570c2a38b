r"""The exact kernel-space posterior on a bordered Cholesky factor (training points added since the factorization)."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.bordered import BorderedCholesky
from ntkgp.linalg.factor import factor_solve, lower_solve
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import NTKProblem, kernel_matmul
from ntkgp.posteriors.downdate import DowndatePosterior
from ntkgp.posteriors.kernel_space import KernelSpacePosterior

__all__ = ["BorderedKernelSpacePosterior"]


class BorderedKernelSpacePosterior(KernelSpacePosterior):
    r"""Predictive covariance :math:`K_{**} - K_{*X}(K + S)^{-1}K_{X*}` with :math:`K + S = L'L'^\top` bordered.

    The same posterior as :class:`~ntkgp.posteriors.kernel_space.KernelSpacePosterior`, with the
    triangular solves run block by block on a :class:`~ntkgp.linalg.bordered.BorderedCholesky`
    (:mod:`ntkgp.solvers.update`). Gaussian likelihoods only.

    Parameters
    ----------
    problem:
        The training problem (all points, the added ones last).
    delta:
        Prior precisions ``(G,)``.
    factor:
        The bordered factor of :math:`K + S`.
    weights:
        :math:`\bar\theta`, ``(P,)``.
    """

    def __init__(self, problem: NTKProblem, delta: Tensor, factor: BorderedCholesky, weights: Tensor) -> None:
        DowndatePosterior.__init__(self, problem.ntk, weights, delta, problem.x, problem.size)
        self.problem, self.hessian_root = problem, None
        #: the bordered factor of :math:`K + S`
        self.bordered = factor

    @property
    def cholesky_factor(self) -> Tensor:  # type: ignore[override]
        """The factor as one dense tensor (assembled on first access)."""
        return self.bordered.dense()

    def downdate(self, x: Inputs, cross: Tensor | None) -> Tensor:
        assert cross is not None
        return lower_solve(self.bordered, cross)

    def _covariance_matmul(self, x: Inputs, rhs: Tensor) -> Tensor:
        rhs = rhs.to(torch.float64)
        ntk, train, C = self.ntk, self.problem.x, self.ntk.num_outputs
        weights = self.delta.to(torch.float64).reciprocal()
        cross = kernel_matmul(ntk, train, x, weights, rhs.T.reshape(rhs.shape[1], x.num, C))
        t = factor_solve(self.bordered, cross.reshape(cross.shape[0], -1).T.to(torch.float64))
        back = kernel_matmul(ntk, x, train, weights, t.T.reshape(t.shape[1], train.num, C))
        return self.prior_matmul(x, rhs) - back.reshape(back.shape[0], -1).T.to(torch.float64)
