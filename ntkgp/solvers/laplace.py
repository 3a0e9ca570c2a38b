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

from ntkgp.linalg.cholesky import cholesky_solve, factored_inv_quad_logdet
from ntkgp.linalg.hessian_root import apply_root, apply_root_transpose, sandwich
from ntkgp.memory import KERNEL_SPACE_MATRICES, WEIGHT_SPACE_MATRICES, check_fits
from ntkgp.ntk import NTKProblem, gram, jacobian_outer, pullback, pushforward
from ntkgp.posteriors.base import Posterior
from ntkgp.posteriors.kernel_space import KernelSpacePosterior
from ntkgp.posteriors.weight_space import WeightSpacePosterior
from ntkgp.solvers.base import LaplaceSolver
from ntkgp.solvers.kernel_space import refuse_sharded

__all__ = ["KernelSpaceLaplaceSolver", "WeightSpaceLaplaceSolver"]


class KernelSpaceLaplaceSolver(LaplaceSolver):
    r"""Cholesky of :math:`I + \sum_g B^\top K_g B / \delta_g`, ``(N*C)`` square."""

    name = "kernel"
    _WHAT = "I + B^T K B"

    def __init__(
        self, problem: NTKProblem, hessian_root: Tensor, grams: Tensor | None = None, *, check_memory: bool = True
    ) -> None:
        refuse_sharded(problem)
        super().__init__(problem, hessian_root)
        M, G = self.size, self.layout.num_groups
        if check_memory:  # False where the caller checked, once, for every solver it builds (ntkgp.solvers.mode)
            check_fits(
                8 * (G + KERNEL_SPACE_MATRICES) * M * M + problem.budget,
                f"the kernel-space Laplace solver ({G} + {KERNEL_SPACE_MATRICES} matrices of {M} x {M}, with gradient)",
                self.network.device,
            )
        #: per-group :math:`B^\top K_g B`, ``(G, M, M)``, float64 (from ``grams``, the per-group
        #: :math:`K_g` of the training inputs, when given: they are not changed)
        self.grams = gram(self.ntk, problem.x) if grams is None else grams.clone()
        for g in range(G):  # in place, one group at a time
            self.grams[g] = sandwich(hessian_root, self.grams[g])
        self._spectrum: Tensor | None = None

    @staticmethod
    def held_bytes(problem: NTKProblem) -> int:
        r"""Bytes a built solver keeps: the ``G`` sandwiched Grams and one Cholesky factor, ``(G + 1) M^2`` float64."""
        return 8 * (problem.layout.num_groups + 1) * problem.size**2

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
    def laplace_posterior(self, delta: Tensor, weights: Tensor | None = None) -> Posterior:
        delta = delta.detach()
        factor = self.factor_and_matrix(lambda: self._matrix(delta), self._WHAT, delta)[0]
        weights = self.network.flat_params.to(torch.float64) if weights is None else weights
        return KernelSpacePosterior(self.problem, delta, factor, weights, hessian_root=self.hessian_root)

    @torch.no_grad()
    def inner_solve(self, delta: Tensor, rhs: Tensor) -> Tensor:
        r""":math:`(I + B^\top K B)^{-1} V` for ``V`` ``(M, t)``, float64, with the cached factor (no gradient)."""
        delta = delta.detach()
        factor = self.factor_and_matrix(lambda: self._matrix(delta), self._WHAT, delta)[0]
        return cholesky_solve(rhs.to(torch.float64), factor)

    @torch.no_grad()
    def spectrum(self) -> Tensor:
        r"""Eigenvalues of :math:`B^\top K_1 B` (one prior group), ascending, ``(M,)``, float64, cached.

        With one group, :math:`\log|I + B^\top K B| = \sum_i \log(1 + \mu_i/\delta)` for every
        :math:`\delta`: after this one ``eigvalsh`` the log-determinant and its derivatives cost ``O(M)``.
        """
        if self.layout.num_groups != 1:
            raise ValueError(f"spectrum() needs one prior group; this layout has {self.layout.num_groups}")
        if self._spectrum is None:
            self._spectrum = torch.linalg.eigvalsh(self.grams[0]).clamp_min(0.0)
        return self._spectrum

    @torch.no_grad()
    def precision_solve(self, delta: Tensor, rhs: Tensor) -> Tensor:
        r""":math:`(P_0 + J^\top\Lambda J)^{-1} V` for ``V`` ``(P, t)``, float64, by Woodbury with the cached factor:

        .. math::
            A^{-1} = P_0^{-1} - P_0^{-1} J^\top B (I + B^\top K B)^{-1} B^\top J P_0^{-1}.
        """
        delta = delta.detach()
        x, C = self.problem.x, self.problem.num_outputs
        inv = delta.to(torch.float64).reciprocal()
        scaled = self.layout.scale(rhs.to(torch.float64).T, inv)  # shape: (t, P)
        pushed = pushforward(self.ntk, x, scaled).to(torch.float64)  # shape: (t, N, C)
        inner = apply_root_transpose(self.hessian_root, pushed.reshape(pushed.shape[0], -1).T)  # shape: (M, t)
        back = apply_root(self.hessian_root, self.inner_solve(delta, inner))  # shape: (M, t)
        pulled = pullback(self.ntk, x, back.T.reshape(-1, x.num, C), scale=inv)  # shape: (t, P)
        return (scaled - pulled).T


class WeightSpaceLaplaceSolver(LaplaceSolver):
    r"""Cholesky of the GGN posterior precision :math:`P_0 + J^\top\Lambda J`, ``P x P``."""

    name = "weight"
    _WHAT = "the GGN posterior precision"

    def __init__(self, problem: NTKProblem, hessian_root: Tensor, *, check_memory: bool = True) -> None:
        super().__init__(problem, hessian_root)
        P = self.network.num_parameters
        if check_memory:  # False where the caller checked, once, for every solver it builds (ntkgp.solvers.mode)
            check_fits(
                8 * (1 + WEIGHT_SPACE_MATRICES) * P * P + problem.budget,
                f"the weight-space Laplace solver ({1 + WEIGHT_SPACE_MATRICES} matrices of {P} x {P}, evidence and "
                "gradient)",
                self.network.device,
            )
        #: :math:`J^\top\Lambda J`, ``(1, P, P)``, float64, summed over ranks
        outer = jacobian_outer(self.ntk, problem.x, per_output=False, hessian_root=hessian_root)
        self.outer = self.sharding.sum_(outer)
        self._spectrum: Tensor | None = None

    @staticmethod
    def held_bytes(problem: NTKProblem) -> int:
        r"""Bytes a built solver keeps: :math:`J^\top\Lambda J` and one Cholesky factor, ``2 P^2`` float64."""
        return 8 * 2 * problem.network.num_parameters**2

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
    def laplace_posterior(self, delta: Tensor, weights: Tensor | None = None) -> Posterior:
        factor = self.factor_and_matrix(lambda: self._matrix(delta.detach()), self._WHAT, delta.detach())[0]
        weights = self.network.flat_params.to(torch.float64) if weights is None else weights
        return WeightSpacePosterior(self.ntk, factor, weights)

    @torch.no_grad()
    def spectrum(self) -> Tensor:
        r"""Eigenvalues of :math:`J^\top\Lambda J`, ascending, ``(P,)``, float64, cached (any prior layout).

        With one prior group, :math:`\log|P_0 + J^\top\Lambda J| - \log|P_0| = \sum_i \log(1 + \mu_i/\delta)`.
        """
        if self._spectrum is None:
            self._spectrum = torch.linalg.eigvalsh(self.outer[0]).clamp_min(0.0)
        return self._spectrum

    @torch.no_grad()
    def precision_solve(self, delta: Tensor, rhs: Tensor) -> Tensor:
        r""":math:`(P_0 + J^\top\Lambda J)^{-1} V` for ``V`` ``(P, t)``, float64, with the cached factor."""
        factor = self.factor_and_matrix(lambda: self._matrix(delta.detach()), self._WHAT, delta.detach())[0]
        return cholesky_solve(rhs.to(torch.float64), factor)
