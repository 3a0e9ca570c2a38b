r"""Exact solves in kernel (function) space: Cholesky of :math:`K + S`, ``(N*C)`` square.

Built once: the per-group Gram matrices :math:`K_g = J_g(X) J_g(X)^\top`, ``(G, M, M)``.
Each evaluation: :math:`K(\delta) = \sum_g K_g/\delta_g` (``G M^2``), one Cholesky
(``M^3/3``). Cost is independent of the number of parameters P after the build.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.cholesky import cholesky, cholesky_solve, factored_inv_quad_logdet
from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import ntk_gram
from ntkgp.memory import check_fits
from ntkgp.parameter_groups import ParameterGroups
from ntkgp.solvers.base import GaussianSolver, SolverBase
from ntkgp.solvers.test_kernel import DowndatePosterior

__all__ = ["KernelSpacePosterior", "KernelSpaceSolver"]


def apply_factor_transpose(hessian_factor: Tensor, rows: Tensor) -> Tensor:
    r""":math:`B^\top R` for block-diagonal ``B`` (blocks ``(N, C, C)``) and ``R`` ``(N*C, k)``."""
    n, c, _ = hessian_factor.shape
    out = torch.einsum("nca,nck->nak", hessian_factor.to(rows.dtype), rows.reshape(n, c, -1))
    return out.reshape(n * c, -1)


def _weighted(delta: Tensor, grams: Tensor) -> Tensor:
    # shape: delta (G,), grams (G, m1, m2) -> (m1, m2)
    return torch.einsum("g,gij->ij", delta.to(grams.dtype).reciprocal(), grams)


class KernelSpaceSolver(GaussianSolver):
    """Cholesky of the ``(N*C) x (N*C)`` kernel plus noise, from cached per-group Grams."""

    name = "kernel"

    def __init__(self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int) -> None:
        super().__init__(network, groups, x, budget)
        M, G = self.size, groups.num_groups
        check_fits(8 * (G + 2) * M * M, f"the kernel-space solver ({G} Gram matrices of {M} x {M})", network.device)
        #: per-group Gram matrices, ``(G, M, M)``, float64
        self.grams = ntk_gram(network, groups, x, budget=budget)

    _WHAT = "the training kernel plus noise (K + S)"

    def _factor(self, delta: Tensor, noise: Tensor) -> Tensor:
        return self.cached_factor(lambda: cholesky(self.dense(delta, noise), what=self._WHAT), delta, noise)

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        kernel = _weighted(delta, self.grams)  # a new (M, M) tensor; noise goes onto its diagonal in place
        kernel.diagonal().add_(noise.to(torch.float64).expand(kernel.shape[0]))
        return kernel

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.dense(delta, noise) @ rhs.to(torch.float64)

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        inv = delta.to(torch.float64).reciprocal()
        return inv @ self.grams.diagonal(dim1=-2, dim2=-1) + noise.to(torch.float64)

    def inv_quad_logdet(
        self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool
    ) -> tuple[Tensor, Tensor]:
        factor, matrix = self.factor_and_matrix(lambda: self.dense(delta, noise), self._WHAT, delta, noise)
        inv_quad, log_det = factored_inv_quad_logdet(factor, None if rhs is None else rhs.to(torch.float64), matrix)
        return inv_quad, log_det if logdet else torch.zeros_like(log_det)

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        return cholesky_solve(rhs.to(torch.float64), self._factor(delta, noise))

    def bilinear_derivative(
        self, delta: Tensor, noise: Tensor, left: Tensor, right: Tensor
    ) -> tuple[Tensor, Tensor]:
        left, right = left.to(torch.float64), right.to(torch.float64)
        quad = torch.einsum("it,gij,jt->g", left, self.grams, right)
        grad_delta = (-quad / delta.detach().to(torch.float64).square()).to(delta.dtype)
        return grad_delta, (left * right).sum(-1).to(noise.dtype)

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> KernelSpacePosterior:
        delta, noise = delta.detach(), noise.detach()
        factor = self._factor(delta, noise)
        alpha = cholesky_solve(residual.to(torch.float64).reshape(-1, 1), factor)
        # posterior weights: theta_bar = P0^{-1} J^T alpha
        cot = alpha.reshape(1, self.x.shape[0], self.network.num_outputs)
        pulled = self.network.vjp(self.x, cot).to(torch.float64)
        weights = self.groups.scale_tangents(pulled, delta.to(torch.float64).reciprocal(), self.network.offsets)[0]
        return KernelSpacePosterior(self, delta, factor, weights)


class KernelSpacePosterior(DowndatePosterior):
    r"""Predictive covariance :math:`K_{**} - K_{*X} (K + S)^{-1} K_{X*}` via the cached Cholesky.

    For the Laplace GP of a non-Gaussian likelihood, with :math:`\Lambda = BB^\top` per point,
    it is :math:`K_{**} - K_{*X} B (I + B^\top K B)^{-1} B^\top K_{X*}` (same code, with
    :math:`B^\top` applied to :math:`K_{X*}` before the triangular solve): the downdate is
    :math:`V = L^{-1} B^\top K_{X*}`. :math:`K_{**}` and :math:`K_{X*}` come from
    :class:`~ntkgp.solvers.test_kernel.TestKernel`.
    """

    def __init__(
        self, solver: SolverBase, delta: Tensor, factor: Tensor, weights: Tensor,
        hessian_factor: Tensor | None = None,
    ) -> None:
        super().__init__(solver.network, solver.groups, weights, solver.budget, delta, solver.x, solver.size)
        self.solver, self.factor = solver, factor
        #: Laplace: per-point ``B`` ``(N, C, C)``; the factor is then that of :math:`I + B^\top K B`
        self.hessian_factor = hessian_factor

    def downdate(self, x: Tensor, cross: Tensor | None) -> Tensor:
        assert cross is not None
        if self.hessian_factor is not None:
            cross = apply_factor_transpose(self.hessian_factor, cross)
        return torch.linalg.solve_triangular(self.factor, cross, upper=False)

    @torch.no_grad()
    def covariance_matmul(self, x: Tensor, rhs: Tensor) -> Tensor:
        if self.hessian_factor is not None:
            return super().covariance_matmul(x, rhs)
        rhs = rhs.to(torch.float64)
        cross = self.kernel.prior_operator(self.solver.x, x)
        t = cholesky_solve(cross._matmul(rhs), self.factor)  # shape: (M, t)
        return self.kernel.prior_operator(x, x)._matmul(rhs) - cross._t_matmul(t)
