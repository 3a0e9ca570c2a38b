r"""Exact solvers for the Laplace GP of a non-Gaussian likelihood.

With :math:`\Lambda = BB^\top` (block diagonal, per-point ``C x C`` blocks, at
:math:`\hat f = f(X;\hat\theta)`) the Laplace evidence is

.. math::
    \log p(y \mid \hat f) - \tfrac12 \hat\theta^\top P_0 \hat\theta - \tfrac12 \log|I + B^\top K B|,

and :math:`\log|I + B^\top K B| = \log|P_0 + J^\top \Lambda J| - \log|P_0|` (determinant lemma),
so it equals the weight-space GGN Laplace evidence exactly. Both forms are cached once:

* kernel space: :math:`B^\top K_g B` per group, ``(G, NC, NC)``;
* weight space: :math:`J^\top \Lambda J`, ``(P, P)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.cholesky import factored_inv_quad_logdet
from ntkgp.linalg.hessian_root import sandwich
from ntkgp.memory import KERNEL_SPACE_MATRICES, WEIGHT_SPACE_MATRICES, check_fits
from ntkgp.ntk import NTKProblem, gram, jacobian_outer
from ntkgp.posteriors.base import Posterior
from ntkgp.posteriors.kernel_space import KernelSpacePosterior
from ntkgp.posteriors.weight_space import WeightSpacePosterior
from ntkgp.solvers.base import LaplaceSolver

__all__ = ["KernelSpaceLaplaceSolver", "WeightSpaceLaplaceSolver"]


class KernelSpaceLaplaceSolver(LaplaceSolver):
    r"""Cholesky of :math:`I + \sum_g B^\top K_g B / \delta_g`, ``(N*C)`` square."""

    name = "kernel"
    _WHAT = "I + B^T K B"

    def __init__(self, problem: NTKProblem, hessian_root: Tensor) -> None:
        super().__init__(problem, hessian_root)
        M, G = self.size, self.layout.num_groups
        check_fits(
            8 * (G + KERNEL_SPACE_MATRICES) * M * M + problem.budget,
            f"the kernel-space Laplace solver ({G} + {KERNEL_SPACE_MATRICES} matrices of {M} x {M}, with gradient)",
            self.network.device,
        )
        #: per-group :math:`B^\top K_g B`, ``(G, M, M)``, float64
        self.grams = gram(self.ntk, problem.x)
        for g in range(G):  # in place, one group at a time
            self.grams[g] = sandwich(hessian_root, self.grams[g])

    def _matrix(self, delta: Tensor) -> Tensor:
        r""":math:`I + \sum_g B^\top K_g B / \delta_g`, ``(M, M)``, differentiable in ``delta``."""
        matrix = self.layout.weighted(delta.to(torch.float64).reciprocal(), self.grams)
        matrix.diagonal().add_(1.0)
        return matrix

    def log_det(self, delta: Tensor) -> Tensor:
        r""":math:`\log|I + B^\top K B|`, differentiable in ``delta`` (gradient from the cached factor)."""
        factor, matrix = self.factor_and_matrix(lambda: self._matrix(delta), self._WHAT, delta)
        return factored_inv_quad_logdet(factor, None, matrix)[1]

    @torch.no_grad()
    def laplace_posterior(self, delta: Tensor) -> Posterior:
        delta = delta.detach()
        factor = self.factor_and_matrix(lambda: self._matrix(delta), self._WHAT, delta)[0]
        weights = self.network.flat_params.to(torch.float64)
        return KernelSpacePosterior(self.problem, delta, factor, weights, hessian_root=self.hessian_root)


class WeightSpaceLaplaceSolver(LaplaceSolver):
    r"""Cholesky of the GGN posterior precision :math:`P_0 + J^\top\Lambda J`, ``P x P``."""

    name = "weight"
    _WHAT = "the GGN posterior precision"

    def __init__(self, problem: NTKProblem, hessian_root: Tensor) -> None:
        super().__init__(problem, hessian_root)
        P = self.network.num_parameters
        check_fits(
            8 * (1 + WEIGHT_SPACE_MATRICES) * P * P + problem.budget,
            f"the weight-space Laplace solver ({1 + WEIGHT_SPACE_MATRICES} matrices of {P} x {P}, evidence and "
            "gradient)",
            self.network.device,
        )
        #: :math:`J^\top\Lambda J`, ``(1, P, P)``, float64
        self.outer = jacobian_outer(self.ntk, problem.x, per_output=False, hessian_root=hessian_root)

    def _matrix(self, delta: Tensor) -> Tensor:
        r""":math:`P_0 + J^\top\Lambda J`, ``(P, P)``, differentiable in ``delta``."""
        matrix = self.outer[0].clone()
        matrix.diagonal().add_(self.layout.expand(delta.to(torch.float64)))
        return matrix

    def log_det(self, delta: Tensor) -> Tensor:
        r""":math:`\log|P_0 + J^\top\Lambda J| - \log|P_0|`, differentiable in ``delta``.

        The gradient comes from the cached factor."""
        prior = self.layout.expand(delta.to(torch.float64))
        factor, matrix = self.factor_and_matrix(lambda: self._matrix(delta), self._WHAT, delta)
        return factored_inv_quad_logdet(factor, None, matrix)[1] - prior.log().sum()

    @torch.no_grad()
    def laplace_posterior(self, delta: Tensor) -> Posterior:
        factor = self.factor_and_matrix(lambda: self._matrix(delta.detach()), self._WHAT, delta.detach())[0]
        return WeightSpacePosterior(self.ntk, factor, self.network.flat_params.to(torch.float64))
