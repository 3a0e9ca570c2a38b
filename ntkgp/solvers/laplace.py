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

from ntkgp.cholesky import factored_inv_quad_logdet
from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import jacobian_outer_products, ntk_gram
from ntkgp.memory import check_fits
from ntkgp.parameter_groups import ParameterGroups
from ntkgp.solvers.base import LaplaceSolver, Posterior
from ntkgp.solvers.kernel_space import KernelSpacePosterior, apply_factor_transpose
from ntkgp.solvers.weight_space import WeightSpacePosterior

__all__ = ["KernelSpaceLaplaceSolver", "WeightSpaceLaplaceSolver", "make_laplace_solver"]


class KernelSpaceLaplaceSolver(LaplaceSolver):
    r"""Cholesky of :math:`I + \sum_g B^\top K_g B / \delta_g`, ``(N*C)`` square."""

    name = "kernel"

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, hessian_factor: Tensor
    ) -> None:
        super().__init__(network, groups, x, budget)
        M, G = self.size, groups.num_groups
        check_fits(8 * (G + 2) * M * M, f"the kernel-space Laplace solver ({G} matrices of {M} x {M})",
                   network.device)
        self.hessian_factor = hessian_factor
        #: per-group :math:`B^\top K_g B`, ``(G, M, M)``, float64
        self.grams = ntk_gram(network, groups, x, budget=budget)
        for g in range(groups.num_groups):  # in place: B^T K_g B, one group at a time
            left = apply_factor_transpose(hessian_factor, self.grams[g])
            self.grams[g] = apply_factor_transpose(hessian_factor, left.T.contiguous()).T

    def _matrix(self, delta: Tensor) -> Tensor:
        r""":math:`I + \sum_g B^\top K_g B / \delta_g`, ``(M, M)``, differentiable in ``delta``."""
        matrix = torch.einsum("g,gij->ij", delta.to(torch.float64).reciprocal(), self.grams)
        matrix.diagonal().add_(1.0)
        return matrix

    def _laplace_factor(self, delta: Tensor) -> Tensor:
        return self.factor_and_matrix(lambda: self._matrix(delta), "I + B^T K B", delta.detach())[0]

    def log_det(self, delta: Tensor) -> Tensor:
        r""":math:`\log|I + B^\top K B|`, differentiable in ``delta`` (gradient from the cached factor)."""
        factor, matrix = self.factor_and_matrix(lambda: self._matrix(delta), "I + B^T K B", delta)
        return factored_inv_quad_logdet(factor, None, matrix)[1]

    @torch.no_grad()
    def laplace_posterior(self, delta: Tensor) -> Posterior:
        delta = delta.detach()
        weights = self.network.flat_params.to(torch.float64)
        return KernelSpacePosterior(self, delta, self._laplace_factor(delta), weights,
                                    hessian_factor=self.hessian_factor)


class WeightSpaceLaplaceSolver(LaplaceSolver):
    r"""Cholesky of the GGN posterior precision :math:`P_0 + J^\top\Lambda J`, ``P x P``."""

    name = "weight"

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, hessian_factor: Tensor
    ) -> None:
        super().__init__(network, groups, x, budget)
        P = network.num_parameters
        check_fits(8 * 3 * P * P, f"the weight-space Laplace solver ({P} x {P})", network.device)
        self.hessian_factor = hessian_factor
        self.outer = jacobian_outer_products(network, x, per_output=False, budget=budget,
                                             hessian_factor=hessian_factor)

    def _matrix(self, delta: Tensor) -> Tensor:
        r""":math:`P_0 + J^\top\Lambda J`, ``(P, P)``, differentiable in ``delta``."""
        prior = self.groups.expand(delta.to(torch.float64), self.network.numels)
        matrix = self.outer[0].clone()
        matrix.diagonal().add_(prior)
        return matrix

    _WHAT = "the GGN posterior precision"

    def _laplace_factor(self, delta: Tensor) -> Tensor:
        return self.factor_and_matrix(lambda: self._matrix(delta), self._WHAT, delta.detach())[0]

    def log_det(self, delta: Tensor) -> Tensor:
        r""":math:`\log|P_0 + J^\top\Lambda J| - \log|P_0|`, differentiable in ``delta``.

        The gradient comes from the cached factor."""
        prior = self.groups.expand(delta.to(torch.float64), self.network.numels)
        factor, matrix = self.factor_and_matrix(lambda: self._matrix(delta), self._WHAT, delta)
        return factored_inv_quad_logdet(factor, None, matrix)[1] - prior.log().sum()

    @torch.no_grad()
    def laplace_posterior(self, delta: Tensor) -> Posterior:
        weights = self.network.flat_params.to(torch.float64)
        return WeightSpacePosterior(self, self._laplace_factor(delta.detach()), weights)


def make_laplace_solver(
    solver: str, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, hessian_factor: Tensor
) -> KernelSpaceLaplaceSolver | WeightSpaceLaplaceSolver:
    """``"auto"`` (weight space when ``P < N C``), ``"kernel"`` or ``"weight"``."""
    if solver == "auto":
        solver = "weight" if network.num_parameters < x.shape[0] * network.num_outputs else "kernel"
    if solver == "kernel":
        return KernelSpaceLaplaceSolver(network, groups, x, budget, hessian_factor)
    if solver == "weight":
        return WeightSpaceLaplaceSolver(network, groups, x, budget, hessian_factor)
    raise ValueError(f"solver must be 'auto', 'kernel' or 'weight', got {solver!r}")
