r"""The train-mode distribution of :class:`~ntkgp.LinearizedGP`: its log density is the solver's.

GPyTorch's :class:`~gpytorch.distributions.MultivariateNormal` evaluates ``log_prob`` through the
covariance's ``inv_quad_logdet`` only while ``fast_computations.log_prob`` is on; otherwise it
forms the dense matrix and calls torch's Cholesky. BoTorch switches that setting off for the
whole process when it is imported, to keep linear_operator's CG and stochastic Lanczos quadrature
out of BO loops. A :class:`~ntkgp.operators.TrainingCovariance` never uses them: its
``inv_quad_logdet`` is the model's solver (an exact Cholesky by default, or the approximate route
the user chose, with its stated accuracy), and some solvers (inducing points, subset of data)
never form the N x N matrix at all. So the log density here always goes to the solver:

.. math::

    \log p(y) = -\tfrac12 \left[ r^\top (K + S)^{-1} r + \log\lvert K + S\rvert + M \log 2\pi \right],
    \qquad r = y - m,\; M = NC.
"""

from __future__ import annotations

import math

from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from torch import Tensor

__all__ = ["TrainingMultitaskMultivariateNormal", "TrainingMultivariateNormal"]


class TrainingMultivariateNormal(MultivariateNormal):
    """A :class:`~gpytorch.distributions.MultivariateNormal` whose ``log_prob`` is its covariance's own solve."""

    def log_prob(self, value: Tensor) -> Tensor:
        """``log N(value; loc, covariance)`` through ``covariance.inv_quad_logdet``, whatever the global settings."""
        if self._validate_args:
            self._validate_sample(value)
        diff = value - self.loc  # shape: (M,)
        inv_quad, log_det = self.lazy_covariance_matrix.inv_quad_logdet(inv_quad_rhs=diff.unsqueeze(-1), logdet=True)
        return -0.5 * (inv_quad + log_det + diff.size(-1) * math.log(2 * math.pi))


class TrainingMultitaskMultivariateNormal(MultitaskMultivariateNormal, TrainingMultivariateNormal):
    """Multi-output: GPyTorch flattens ``(N, C)`` values, then :class:`TrainingMultivariateNormal` scores them."""
