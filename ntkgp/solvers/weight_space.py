r"""Exact solves in weight space (the dual form), for networks with fewer parameters than N*C.

With :math:`S = \operatorname{diag}(s)` constant over data points (one :math:`s_c` per output)
and :math:`P_0 = \operatorname{diag}(\delta)`:

.. math::
    A &= P_0 + \sum_c s_c^{-1} J_c^\top J_c \qquad (P \times P)\\
    \log|K + S| &= \log|S| - \log|P_0| + \log|A|\\
    r^\top (K + S)^{-1} r &= r^\top S^{-1} r - b^\top A^{-1} b, \qquad b = J^\top S^{-1} r

(matrix determinant lemma and Woodbury). Built once: :math:`J_c^\top J_c`, ``(C, P, P)``.
Each evaluation: one ``P x P`` Cholesky and one batched vjp for ``b``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.cholesky import cholesky, cholesky_solve, factored_inv_quad_logdet
from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import jacobian_outer_products
from ntkgp.memory import check_fits
from ntkgp.operators.jacobian_linear_operator import JacobianLinearOperator
from ntkgp.parameter_groups import ParameterGroups
from ntkgp.solvers.base import GaussianSolver, Posterior, SolverBase

__all__ = ["WeightSpacePosterior", "WeightSpaceSolver"]


class WeightSpaceSolver(GaussianSolver):
    """Cholesky of the ``P x P`` posterior precision, from cached per-output :math:`J_c^\\top J_c`."""

    name = "weight"

    def __init__(self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int) -> None:
        super().__init__(network, groups, x, budget)
        P, C = network.num_parameters, network.num_outputs
        check_fits(8 * (C + 2) * P * P, f"the weight-space solver ({C} matrices of {P} x {P})", network.device)
        #: per-output :math:`J_c^\top J_c`, ``(C, P, P)``, float64
        self.outer = jacobian_outer_products(network, x, per_output=C > 1, budget=budget)
        self.jacobian = JacobianLinearOperator(x, network=network)

    def _output_noise(self, noise: Tensor) -> Tensor:
        # shape: noise (N*C,) -> (C,); the dual form needs noise constant over data points
        per_point = noise.to(torch.float64).reshape(self.x.shape[0], self.network.num_outputs)
        if not torch.equal(per_point, per_point[:1].expand_as(per_point)):
            raise NotImplementedError(
                "the weight-space solver needs noise that is the same for every data point "
                "(per-output noise is fine); use solver='kernel' for per-point noise"
            )
        return per_point[0]

    def _precision(self, delta: Tensor, noise_c: Tensor) -> Tensor:
        prior = self.groups.expand(delta.to(torch.float64), self.network.numels)
        if self.outer.shape[0] == 1:
            data = self.outer[0] / noise_c[0]
        else:
            data = torch.einsum("c,cpq->pq", noise_c.reciprocal(), self.outer)
        return data + torch.diag_embed(prior)

    _WHAT = "the posterior precision (P0 + J^T S^-1 J)"

    def _factor(self, delta: Tensor, noise_c: Tensor) -> Tensor:
        return self.cached_factor(lambda: cholesky(self._precision(delta, noise_c), what=self._WHAT), delta, noise_c)

    def _pull(self, rhs: Tensor, noise_c: Tensor) -> Tensor:
        r"""``b = J^T S^{-1} rhs``, ``(P, t)``, differentiable in ``rhs`` and the noise."""
        N, C = self.x.shape[0], self.network.num_outputs
        rhs = rhs.to(torch.float64)
        if self.outer.shape[0] == 1:
            return self.jacobian.mT.matmul(rhs.to(self.network.dtype)).to(torch.float64) / noise_c[0]
        scaled = (rhs.reshape(N, C, -1) / noise_c.reshape(1, C, 1)).reshape(N * C, -1)
        return self.jacobian.mT.matmul(scaled.to(self.network.dtype)).to(torch.float64)

    def inv_quad_logdet(
        self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool
    ) -> tuple[Tensor, Tensor]:
        noise_c = self._output_noise(noise)
        factor, matrix = self.factor_and_matrix(lambda: self._precision(delta, noise_c), self._WHAT, delta, noise_c)
        zero = torch.zeros((), dtype=torch.float64, device=factor.device)
        inv_quad, data_term, pulled = zero, zero, None
        if rhs is not None:
            N, C = self.x.shape[0], self.network.num_outputs
            r = rhs.to(torch.float64)
            data_term = (r.reshape(N, C, -1).square() / noise_c.reshape(1, C, 1)).sum((0, 1))
            pulled = self._pull(r, noise_c)
        quad, log_det_precision = factored_inv_quad_logdet(factor, pulled, matrix)
        if rhs is not None:
            inv_quad = data_term - quad
        log_det = zero
        if logdet:
            prior = self.groups.expand(delta.to(torch.float64), self.network.numels)
            log_det = self.x.shape[0] * noise_c.log().sum() - prior.log().sum() + log_det_precision
        return inv_quad, log_det

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        # (K + S)^{-1} r = S^{-1} r - S^{-1} J A^{-1} J^T S^{-1} r
        N, C = self.x.shape[0], self.network.num_outputs
        noise_c = self._output_noise(noise)
        factor = self._factor(delta, noise_c)
        r = rhs.to(torch.float64)
        inner = cholesky_solve(self._pull(r, noise_c), factor)
        back = self.jacobian.matmul(inner.to(self.network.dtype)).to(torch.float64)
        return ((r - back).reshape(N, C, -1) / noise_c.reshape(1, C, 1)).reshape(N * C, -1)

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        return self.ntk(delta).to_dense().to(torch.float64) + torch.diag_embed(noise.to(torch.float64))

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        with torch.no_grad():
            rhs = rhs.to(torch.float64)
            return self.ntk(delta)._matmul(rhs) + noise.to(torch.float64).unsqueeze(-1) * rhs

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        return self.ntk(delta)._diagonal().to(torch.float64) + noise.to(torch.float64)

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> WeightSpacePosterior:
        delta, noise = delta.detach(), noise.detach()
        noise_c = self._output_noise(noise)
        factor = self._factor(delta, noise_c)
        b = self._pull(residual.reshape(-1, 1), noise_c)
        weights = cholesky_solve(b, factor)[:, 0]
        return WeightSpacePosterior(self, factor, weights)


class WeightSpacePosterior(Posterior):
    r"""Predictive covariance :math:`J_* A^{-1} J_*^\top` (the GLM predictive)."""

    def __init__(self, solver: SolverBase, factor: Tensor, weights: Tensor) -> None:
        super().__init__(solver.network, solver.groups, weights, solver.budget)
        self.solver, self.factor = solver, factor

    def _solved_jacobian(self, x: Tensor) -> Tensor:
        # shape: x (n, D) -> V = L^{-1} J_*^T, (P, n*C)
        jac = self.network.jacobian_block(x).reshape(-1, self.network.num_parameters).to(torch.float64)
        return torch.linalg.solve_triangular(self.factor, jac.T, upper=False)

    @torch.no_grad()
    def covariance(self, x: Tensor) -> Tensor:
        v = self._solved_jacobian(x)
        return v.T @ v

    @torch.no_grad()
    def covariance_blocks(self, x: Tensor) -> Tensor:
        C = self.network.num_outputs
        parts = []
        for _, xb in self.network.chunks(x, self.rows_per_block(self.network.num_parameters), desc="predictive"):
            v = self._solved_jacobian(xb).reshape(-1, xb.shape[0], C)  # shape: (P, n, C)
            parts.append(torch.einsum("pnc,pnd->ncd", v, v))
        return torch.cat(parts)

    @torch.no_grad()
    def covariance_diagonal(self, x: Tensor) -> Tensor:
        return self.covariance_blocks(x).diagonal(dim1=-2, dim2=-1).reshape(-1)

    @torch.no_grad()
    def covariance_matmul(self, x: Tensor, rhs: Tensor) -> Tensor:
        jac = JacobianLinearOperator(x, network=self.network)
        inner = cholesky_solve(jac._t_matmul(rhs.to(self.network.dtype)).to(torch.float64), self.factor)
        return jac._matmul(inner.to(self.network.dtype)).to(torch.float64)
