r"""Exact solves in kernel (function) space: Cholesky of :math:`K + S`, ``(N*C)`` square.

Built once: the per-group Gram matrices :math:`K_g = J_g(X) J_g(X)^\top`, ``(G, M, M)``.
Each evaluation: :math:`K(\delta) = \sum_g K_g/\delta_g` (``G M^2``), one Cholesky
(``M^3/3``). Cost is independent of the number of parameters P after the build.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.cholesky import cholesky
from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import ntk_gram, structured_gram
from ntkgp.memory import check_fits
from ntkgp.parameter_groups import ParameterGroups
from ntkgp.solvers.base import ExactPosterior, ExactSolver, SolverBase

__all__ = ["KernelSpacePosterior", "KernelSpaceSolver"]


def apply_factor_transpose(hessian_factor: Tensor, rows: Tensor) -> Tensor:
    r""":math:`B^\top R` for block-diagonal ``B`` (blocks ``(N, C, C)``) and ``R`` ``(N*C, k)``."""
    n, c, _ = hessian_factor.shape
    out = torch.einsum("nca,nck->nak", hessian_factor.to(rows.dtype), rows.reshape(n, c, -1))
    return out.reshape(n * c, -1)


def _weighted(delta: Tensor, grams: Tensor) -> Tensor:
    # shape: delta (G,), grams (G, m1, m2) -> (m1, m2)
    return torch.einsum("g,gij->ij", delta.to(grams.dtype).reciprocal(), grams)


class KernelSpaceSolver(ExactSolver):
    """Cholesky of the ``(N*C) x (N*C)`` kernel plus noise, from cached per-group Grams."""

    name = "kernel"

    def __init__(self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int) -> None:
        super().__init__(network, groups, x, budget)
        M, G = self.size, groups.num_groups
        check_fits(8 * (G + 2) * M * M, f"the kernel-space solver ({G} Gram matrices of {M} x {M})", network.device)
        #: per-group Gram matrices, ``(G, M, M)``, float64
        self.grams = ntk_gram(network, groups, x, budget=budget)

    def _factor(self, delta: Tensor, noise: Tensor) -> Tensor:
        return self.cached_factor(
            lambda: cholesky(self.dense(delta, noise), what="the training kernel plus noise (K + S)"), delta, noise
        )

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        return _weighted(delta, self.grams) + torch.diag_embed(noise.to(torch.float64))

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.dense(delta, noise) @ rhs.to(torch.float64)

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        inv = delta.to(torch.float64).reciprocal()
        return inv @ self.grams.diagonal(dim1=-2, dim2=-1) + noise.to(torch.float64)

    def inv_quad_logdet(
        self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool
    ) -> tuple[Tensor, Tensor]:
        factor = self._factor(delta, noise)
        zero = torch.zeros((), dtype=torch.float64, device=factor.device)
        inv_quad = zero
        if rhs is not None:
            w = torch.linalg.solve_triangular(factor, rhs.to(torch.float64), upper=False)
            inv_quad = w.square().sum(-2)
        log_det = 2.0 * factor.diagonal().log().sum() if logdet else zero
        return inv_quad, log_det

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        return torch.cholesky_solve(rhs.to(torch.float64), self._factor(delta, noise))

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
        alpha = torch.cholesky_solve(residual.to(torch.float64).reshape(-1, 1), factor)
        # posterior weights: theta_bar = P0^{-1} J^T alpha
        cot = alpha.reshape(1, self.x.shape[0], self.network.num_outputs)
        pulled = self.network.vjp(self.x, cot).to(torch.float64)
        weights = self.groups.scale_tangents(pulled, delta.to(torch.float64).reciprocal(), self.network.offsets)[0]
        return KernelSpacePosterior(self, delta, factor, weights)


class KernelSpacePosterior(ExactPosterior):
    r"""Predictive covariance :math:`K_{**} - K_{*X} (K + S)^{-1} K_{X*}` via the cached Cholesky.

    For the Laplace GP of a non-Gaussian likelihood, with :math:`\Lambda = BB^\top` per point,
    it is :math:`K_{**} - K_{*X} B (I + B^\top K B)^{-1} B^\top K_{X*}` (same code, with
    :math:`B^\top` applied to :math:`K_{X*}` before the triangular solve).

    For each block of test points, the prior block :math:`K_{**}` and the cross-covariance
    :math:`K_{X*}` are formed in one pass: ``nn.Linear`` layers by structured products of layer
    factors (the training factors are cached), every other parameter tensor from the test
    block's Jacobian :math:`J_*` scaled by :math:`P_0^{-1}`, as :math:`J_X (P_0^{-1} J_*^\top)`.
    That training Jacobian is kept in memory when it fits in the budget.
    """

    def __init__(
        self, solver: SolverBase, delta: Tensor, factor: Tensor, weights: Tensor,
        hessian_factor: Tensor | None = None,
    ) -> None:
        super().__init__(solver.network, solver.groups, weights, solver.budget)
        self.solver, self.delta, self.factor = solver, delta, factor
        #: Laplace: per-point ``B`` ``(N, C, C)``; the factor is then that of :math:`I + B^\top K B`
        self.hessian_factor = hessian_factor
        network = self.network
        self.group_weights = delta.to(torch.float64).reciprocal()
        self.rest = network.generic_tensors
        self.rest_width = sum(network.numels[t] for t in self.rest)
        per_param = self.groups.expand(delta.reciprocal(), network.numels).to(network.dtype)
        #: :math:`P_0^{-1}` on the generically handled columns, ``(P_rest,)``
        self.rest_prior_variance = torch.cat(
            [per_param[network.offsets[t] : network.offsets[t + 1]] for t in self.rest]
        ) if self.rest else per_param[:0]
        self.train_factors = network.linear_layer_factors(solver.x) if network.linear_layers else []
        self._train_rest_jacobian: Tensor | None = None
        if self.rest and solver.size * self.rest_width * network.dtype.itemsize <= self.budget // 2:
            self._train_rest_jacobian = network.jacobian_block(solver.x, self.rest).reshape(-1, self.rest_width)

    def _test_parts(self, x: Tensor, full: bool) -> tuple[Tensor, Tensor]:
        """For test inputs ``x``: the prior covariance (dense ``(n*C, n*C)`` if ``full``, else the
        per-point blocks ``(n, C, C)``) and ``V = L^{-1} B^T K_{X*}`` ``(M, n*C)``.

        Memory is linear in ``n`` unless ``full``.
        """
        C = self.network.num_outputs
        n, m = x.shape[0], self.solver.size
        device = self.network.device
        cross = torch.zeros(m, n * C, dtype=torch.float64, device=device)
        prior = torch.zeros(*((n * C, n * C) if full else (n, C, C)), dtype=torch.float64, device=device)
        if self.train_factors:
            test_factors = self.network.linear_layer_factors(x)
            structured_gram(self.network, self.groups, self.train_factors, test_factors, cross,
                            weights=self.group_weights)
            if full:
                structured_gram(self.network, self.groups, test_factors, test_factors, prior,
                                weights=self.group_weights)
            else:
                prior += self._structured_point_blocks(test_factors, n)
        if self.rest:
            jac = self.network.jacobian_block(x, self.rest).reshape(-1, self.rest_width)
            scaled = jac * self.rest_prior_variance  # shape: (n*C, P_rest)
            if full:
                prior += (scaled @ jac.T).to(torch.float64)
            else:
                prior += torch.einsum("ncp,ndp->ncd", scaled.reshape(n, C, -1), jac.reshape(n, C, -1)).to(torch.float64)
            if self._train_rest_jacobian is not None:
                cross += (self._train_rest_jacobian @ scaled.T).to(torch.float64)
            else:
                rows = max(1, self.budget // (2 * C * self.rest_width * jac.element_size()))
                parts = [self.network.jacobian_block(xt, self.rest).reshape(-1, self.rest_width) @ scaled.T
                         for _, xt in self.network.chunks(self.solver.x, rows, desc="cross")]
                cross += torch.cat(parts).to(torch.float64)
        if self.hessian_factor is not None:
            cross = apply_factor_transpose(self.hessian_factor, cross)
        return prior, torch.linalg.solve_triangular(self.factor, cross, upper=False)

    def _structured_point_blocks(self, factors: list[tuple[Tensor, ...]], n: int, size: int = 64) -> Tensor:
        r"""Per-point ``C x C`` prior blocks of the structured layers.

        ``nn.Linear``: :math:`w_W\lVert a_n\rVert^2 g_n g_n^\top + w_b g_n g_n^\top` for all points
        in one batched product; other structured layers (convolutions) through their
        ``size``-point diagonal Gram blocks.
        """
        C = self.network.num_outputs
        out = torch.zeros(n, C, C, dtype=torch.float64, device=self.network.device)
        weights = self.group_weights
        layers = list(self.network.structured_layers)
        if all(layer.kind == "linear" for layer in layers):
            for layer, (a, g) in zip(layers, factors):
                g = g.to(torch.float64)  # shape: (n, C, d_out)
                gg = torch.einsum("ncd,ned->nce", g, g)
                scale = torch.zeros(n, dtype=torch.float64, device=out.device)
                if layer.weight is not None:
                    norms = a.to(torch.float64).square().sum(-1)  # shape: (n,)
                    scale = scale + weights[self.groups.tensor_group[layer.weight]] * norms
                if layer.bias is not None:
                    scale = scale + weights[self.groups.tensor_group[layer.bias]]
                out += scale[:, None, None] * gg
            return out
        for start in range(0, n, size):
            part = [tuple(t[start : start + size] for t in layer) for layer in factors]
            r = min(size, n - start)
            block = torch.zeros(r * C, r * C, dtype=torch.float64, device=self.network.device)
            structured_gram(self.network, self.groups, part, part, block, weights=weights)
            out[start : start + r] = block.reshape(r, C, r, C).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return out

    def _test_rows(self) -> int:
        per_point = self.network.num_outputs * (self.rest_width * self.network.dtype.itemsize * 2
                                                + 8 * 2 * self.solver.size)
        return max(1, self.budget // (2 * per_point))

    @torch.no_grad()
    def covariance(self, x: Tensor) -> Tensor:
        prior, v = self._test_parts(x, full=True)
        return prior - v.T @ v

    @torch.no_grad()
    def covariance_blocks(self, x: Tensor) -> Tensor:
        C = self.network.num_outputs
        parts = []
        for _, xb in self.network.chunks(x, self._test_rows(), desc="predictive blocks"):
            prior, v = self._test_parts(xb, full=False)
            v = v.reshape(v.shape[0], xb.shape[0], C)
            parts.append(prior - torch.einsum("mnc,mnd->ncd", v, v))
        return torch.cat(parts)

    @torch.no_grad()
    def covariance_diagonal(self, x: Tensor) -> Tensor:
        return self.covariance_blocks(x).diagonal(dim1=-2, dim2=-1).reshape(-1)

    @torch.no_grad()
    def covariance_matmul(self, x: Tensor, rhs: Tensor) -> Tensor:
        rhs = rhs.to(torch.float64)
        ntk = self.solver.ntk(self.delta)
        cross = type(ntk)(self.solver.x, x, self.delta, network=self.network, groups=self.groups, budget=self.budget)
        prior = type(ntk)(x, x, self.delta, network=self.network, groups=self.groups, budget=self.budget)
        t = torch.cholesky_solve(cross._matmul(rhs), self.factor)  # shape: (M, t)
        return prior._matmul(rhs) - cross._t_matmul(t)
