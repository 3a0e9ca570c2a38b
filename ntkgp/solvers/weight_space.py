r"""Exact solves in weight space (the dual form), for networks with fewer parameters than N*C.

With :math:`S = \operatorname{diag}(s)` constant over data points (one :math:`s_c` per output)
and :math:`P_0 = \operatorname{diag}(\delta)`:

.. math::
    A &= P_0 + \sum_c s_c^{-1} J_c^\top J_c \qquad (P \times P)\\
    \log|K + S| &= \log|S| - \log|P_0| + \log|A|\\
    r^\top (K + S)^{-1} r &= r^\top S^{-1} r - b^\top A^{-1} b, \qquad b = J^\top S^{-1} r

(matrix determinant lemma and Woodbury). Built once: :math:`J_c^\top J_c`, ``(C, P, P)``.
Each evaluation: one ``P x P`` Cholesky and one batched vjp for ``b``. After points were added
(:mod:`ntkgp.solvers.update`) the factor at the hyperparameters of the update may be a
:class:`~ntkgp.linalg.woodbury.WoodburyFactor`: everything here takes factors through
:mod:`ntkgp.linalg.factor`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ntkgp.linalg.cholesky import cholesky, factored_inv_quad_logdet
from ntkgp.linalg.factor import AnyFactor, factor_logdet, factor_solve, lower_solve
from ntkgp.memory import WEIGHT_SPACE_MATRICES, check_fits
from ntkgp.ntk import NTKProblem, gram, jacobian_outer, pullback, pushforward
from ntkgp.posteriors.weight_space import WeightSpacePosterior
from ntkgp.solvers.base import GaussianSolver, needs_grad, output_noise

__all__ = ["WeightSpaceSolver"]


class WeightSpaceSolver(GaussianSolver):
    """Cholesky of the ``P x P`` posterior precision, from cached per-output :math:`J_c^\\top J_c`."""

    name = "weight"
    _WHAT = "the posterior precision (P0 + J^T S^-1 J)"

    def __init__(self, problem: NTKProblem, *, outer: Tensor | None = None) -> None:
        super().__init__(problem)
        P, C = self.network.num_parameters, problem.num_outputs
        check_fits(
            8 * (C + WEIGHT_SPACE_MATRICES) * P * P + problem.budget,
            f"the weight-space solver ({C} + {WEIGHT_SPACE_MATRICES} matrices of {P} x {P}, evidence and gradient)",
            self.network.device,
        )
        self._outer = (
            self.sharding.sum_(jacobian_outer(self.ntk, problem.x, per_output=C > 1)) if outer is None else outer
        )
        self._spectrum: tuple[Tensor, Tensor] | None = None
        #: :math:`b = J^\top S^{-1} r` of the last posterior: ``(r, s, b)``, and the Jacobian ``(k, C, P)`` of
        #: points appended since (their rows of :math:`r` are the last ``kC``), or ``None``
        self._pulled: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None

    @property
    def outer(self) -> Tensor:
        r"""Per-output :math:`J_c^\top J_c`, ``(C, P, P)``, float64, summed over ranks (given when extended,
        :mod:`ntkgp.solvers.update`)."""
        return self._outer

    def outer_parts(self) -> tuple[Tensor, Tensor | None]:
        r""":attr:`outer` as a dense part ``(C, P, P)`` and the Jacobian ``(k, C, P)`` of points whose rows
        are not in it yet (``None`` when none): :attr:`outer` is the dense part plus
        :math:`\sum_k J_{kc}^\top J_{kc}`. Never modified (an extended solver makes a new matrix)."""
        return self._outer, None

    @torch.no_grad()
    def spectrum(self) -> tuple[Tensor, Tensor]:
        r"""Eigenvalues ``(P,)`` (ascending) and eigenvectors ``(P, P)`` of :math:`J^\top J = \sum_c J_c^\top J_c`.

        With one noise variance :math:`\sigma^2` for every output, :math:`A = P_0 + J^\top J/\sigma^2`; with one
        prior group its eigenvalues are :math:`\delta + \mu_i/\sigma^2` for every :math:`(\delta, \sigma^2)`.
        """
        if self._spectrum is None:
            values, vectors = torch.linalg.eigh(self.outer.sum(0))
            self._spectrum = (values.clamp_min(0.0), vectors)
        return self._spectrum

    def pull_residual(self, residual: Tensor) -> Tensor:
        r""":math:`J^\top r` for a residual ``r`` ``(N*C,)``: ``(P,)``, float64 (one vjp pass)."""
        N, C = self.problem.num_data, self.problem.num_outputs
        pulled = pullback(self.ntk, self.problem.x, residual.detach().to(torch.float64).reshape(1, N, C))
        return self.sharding.sum_(pulled)[0]

    def pulled_residual(self, residual: Tensor, noise_c: Tensor) -> Tensor:
        r""":math:`b = J^\top S^{-1} r` ``(P,)``, float64, for the residual ``r`` ``(N*C,)`` of the posterior weights.

        Kept with its ``r`` and :math:`s`: the same residual again costs nothing, and after points were
        appended (:meth:`extend_pulled`) with the old rows unchanged,
        :math:`b' = b + J_{new}^\top S^{-1} r_{new}` costs ``k C P`` flops instead of a vjp over all N points.
        """
        C = self.problem.num_outputs
        r = residual.detach().to(torch.float64).reshape(-1)
        held, b = self._pulled, None
        if held is not None and not self.sharding.distributed:
            old_r, old_noise, old_b, new_jac = held
            M, k = old_r.numel(), 0 if new_jac is None else new_jac.shape[0]
            if r.numel() == M + k * C and torch.equal(old_noise, noise_c) and torch.equal(r[:M], old_r):
                b = old_b
                if new_jac is not None:
                    scaled = r[M:].reshape(k, C) / noise_c  # shape: (k, C)
                    b = old_b + torch.einsum("kcp,kc->p", new_jac.to(torch.float64), scaled)
        if b is None:
            b = self._pull(r.reshape(-1, 1), noise_c)[:, 0]
        self._pulled = (r.clone(), noise_c.detach().clone(), b, None)
        return b

    def extend_pulled(self, base: WeightSpaceSolver, new_jacobian: Tensor) -> None:
        """Continue ``base``'s kept :math:`b` (:meth:`pulled_residual`) on this solver, whose data are ``base``'s
        plus points of Jacobian ``new_jacobian`` ``(k, C, P)``, appended."""
        held = base._pulled
        if held is not None:  # points appended twice without a posterior between: both sets' rows
            appended = new_jacobian if held[3] is None else torch.cat([held[3], new_jacobian])
            self._pulled = (held[0], held[1], held[2], appended)

    def _precision(self, delta: Tensor, noise_c: Tensor) -> Tensor:
        r""":math:`P_0 + \sum_c s_c^{-1} J_c^\top J_c`, ``(P, P)``: one new matrix, the prior added to its diagonal."""
        prior = self.layout.expand(delta.to(torch.float64))
        if self.outer.shape[0] == 1:
            matrix = self.outer[0] / noise_c[0]
        else:
            matrix = torch.einsum("c,cpq->pq", noise_c.reciprocal(), self.outer)
        matrix.diagonal().add_(prior)
        return matrix

    def _factor(self, delta: Tensor, noise_c: Tensor) -> AnyFactor:
        """The factor of the posterior precision (cached; differentiable when ``delta`` or ``noise_c`` need it)."""
        return self.cached_factor(lambda: cholesky(self._precision(delta, noise_c), what=self._WHAT), delta, noise_c)

    def _pull(self, rhs: Tensor, noise_c: Tensor) -> Tensor:
        r"""``b = J^T S^{-1} rhs``, ``(P, t)``, float64, summed over ranks."""
        N, C = self.problem.num_data, self.problem.num_outputs
        scaled = rhs.to(torch.float64).reshape(N, C, -1) / noise_c.reshape(1, C, 1)  # shape: (N, C, t)
        return self.sharding.sum(pullback(self.ntk, self.problem.x, scaled.permute(2, 0, 1))).T

    def inv_quad_logdet(self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool) -> tuple[Tensor, Tensor]:
        noise_c = output_noise(noise, self.problem.num_outputs, "weight-space", sharding=self.sharding)
        zero = torch.zeros((), dtype=torch.float64, device=self.network.device)
        inv_quad, data_term, pulled = zero, zero, None
        if rhs is not None:
            N, C = self.problem.num_data, self.problem.num_outputs
            r = rhs.to(torch.float64)
            local_noise = self.sharding.enter(noise_c)  # used on this rank's rows: its gradient summed over ranks
            data_term = self.sharding.sum((r.reshape(N, C, -1).square() / local_noise.reshape(1, C, 1)).sum((0, 1)))
            pulled = self._pull(r.detach(), noise_c.detach())
            if rhs.requires_grad or noise_c.requires_grad:  # b is linear in r and S^-1: its gradient by autograd
                pulled = self._pull_differentiable(r, local_noise, pulled)
        if needs_grad(delta, noise_c, *([] if pulled is None else [pulled])):
            factor, matrix = self.factor_and_matrix(lambda: self._precision(delta, noise_c), self._WHAT, delta, noise_c)
            quad, log_det_precision = factored_inv_quad_logdet(factor, pulled, matrix)
        else:  # any factor (:mod:`ntkgp.linalg.factor`)
            held = self._factor(delta, noise_c)
            quad = zero if pulled is None else lower_solve(held, pulled).square().sum(-2)
            log_det_precision = factor_logdet(held)
        if rhs is not None:
            inv_quad = data_term - quad
        log_det = zero
        if logdet:
            prior = self.layout.expand(delta.to(torch.float64))
            log_det = self.problem.total_data * noise_c.log().sum() - prior.log().sum() + log_det_precision
        return inv_quad, log_det

    def _pull_differentiable(self, r: Tensor, noise_c: Tensor, pulled: Tensor) -> Tensor:
        """``b`` with the gradient of :math:`J^\\top S^{-1} r` in ``r`` and ``noise_c`` (the Jacobian is fixed)."""
        return _LinearPull.apply(r, noise_c, pulled, self)

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        # (K + S)^{-1} r = S^{-1} r - S^{-1} J A^{-1} J^T S^{-1} r
        N, C = self.problem.num_data, self.problem.num_outputs
        noise_c = output_noise(noise, C, "weight-space", sharding=self.sharding)
        factor = self._factor(delta, noise_c)
        r = rhs.to(torch.float64)
        inner = factor_solve(factor, self._pull(r, noise_c))  # shape: (P, t)
        back = pushforward(self.ntk, self.problem.x, inner.T)  # shape: (t, N, C)
        back = back.reshape(back.shape[0], -1).T.to(torch.float64)
        return ((r - back).reshape(N, C, -1) / noise_c.reshape(1, C, 1)).reshape(N * C, -1)

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        if self.sharding.distributed:
            raise NotImplementedError("a sharded solver does not form the N C x N C training covariance")
        weights = delta.to(torch.float64).reciprocal()
        kernel = self.layout.weighted(weights, gram(self.ntk, self.problem.x))
        return kernel + torch.diag_embed(noise.to(torch.float64))

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        from ntkgp.ntk import kernel_matmul

        with torch.no_grad():
            rhs = rhs.to(torch.float64)
            x, C = self.problem.x, self.problem.num_outputs
            cols = rhs.T.reshape(rhs.shape[1], x.num, C)
            reduce = self.sharding.sum if self.sharding.distributed else None
            out = kernel_matmul(self.ntk, x, x, delta.detach().reciprocal(), cols, reduce=reduce)
            return out.reshape(out.shape[0], -1).T.to(torch.float64) + noise.to(torch.float64).unsqueeze(-1) * rhs

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        return self.exact_diagonal(delta, noise)

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> WeightSpacePosterior:
        delta, noise = delta.detach(), noise.detach()
        noise_c = output_noise(noise, self.problem.num_outputs, "weight-space", sharding=self.sharding)
        factor = self._factor(delta, noise_c)
        weights = factor_solve(factor, self.pulled_residual(residual, noise_c).unsqueeze(1))[:, 0]
        return WeightSpacePosterior(self.ntk, factor, weights)


class _LinearPull(torch.autograd.Function):
    r""":math:`b = J^\top S^{-1} r` (computed), with gradients in ``r`` and the per-output noise."""

    @staticmethod
    def forward(ctx: Any, r: Tensor, noise_c: Tensor, pulled: Tensor, solver: WeightSpaceSolver) -> Tensor:
        ctx.save_for_backward(r, noise_c)
        ctx.solver = solver
        return pulled

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        r, noise_c = ctx.saved_tensors
        solver: WeightSpaceSolver = ctx.solver
        N, C = solver.problem.num_data, solver.problem.num_outputs
        # J grad: (N*C, t); d b / d r = J^T S^{-1}, d b / d s_c = -J_c^T r_c / s_c^2
        pushed = pushforward(solver.ntk, solver.problem.x, grad.T).to(torch.float64)  # shape: (t, N, C)
        pushed = pushed.permute(1, 2, 0)  # shape: (N, C, t)
        grad_r = (pushed / noise_c.reshape(1, C, 1)).reshape(N * C, -1)
        grad_noise = -(pushed * r.reshape(N, C, -1)).sum((0, 2)) / noise_c.square()
        return grad_r, grad_noise, None, None
