r"""The collapsed (Titsias) bound and the SGPR posterior, Gaussian likelihood (:mod:`ntkgp.solvers.inducing`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.cholesky import cholesky_solve
from ntkgp.ntk import NTKProblem, pullback
from ntkgp.posteriors.inducing import InducingPosterior
from ntkgp.solvers.base import EvidenceOnlyGaussianSolver, output_noise
from ntkgp.solvers.inducing.caches import InducingCaches

__all__ = ["InducingSolver"]


class InducingSolver(InducingCaches, EvidenceOnlyGaussianSolver):
    """The collapsed (Titsias) bound and SGPR posterior for a Gaussian likelihood."""

    name = "inducing"

    def __init__(
        self,
        problem: NTKProblem,
        indices: Tensor,
        jitter: float = 1e-8,
        *,
        mean: str = "posterior",
        prior_residual: bool = True,
    ) -> None:
        C, G = problem.num_outputs, problem.layout.num_groups
        super().__init__(problem, indices, jitter, blocks=C, prior_residual=prior_residual)
        #: ``"posterior"`` (SGPR mean) or ``"network"`` (the MAP network's outputs)
        self.mean = mean
        #: per-group, per-output traces :math:`\sum_n K^g_{(n,c),(n,c)}`, ``(C, G)`` (summed over ranks),
        #: accumulated in the first pass over the data, with :math:`\Phi`
        self.traces = torch.zeros(C, G, dtype=torch.float64, device=self.network.device)
        self._rhs: Tensor | None = None  # the right-hand side whose projections are cached
        self._projected: Tensor | None = None  # (C, G, MC, t): K^g_{Z X_c} r_c
        self._rhs_square: Tensor | None = None  # (C, t): sum over points of r_c^2
        self._phi_ready = False  # Phi is accumulated in the same data pass as the first projection
        self._stash: tuple[tuple[Tensor, Tensor, bool], Tensor] | None = None

    # ----------------------------------------------------------------- noise
    def _output_noise(self, noise: Tensor) -> Tensor:
        """One noise variance per output, ``(C,)``; the bound needs noise constant over the data."""
        return output_noise(noise, self.problem.num_outputs, "inducing-point", sharding=self.sharding)

    def _projections(self, rhs: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`K^g_{Z X_c} r_c` ``(C, G, MC, t)`` and :math:`\sum_n r_{n,c}^2` ``(C, t)``, cached."""
        rhs = rhs.detach().to(torch.float64)
        same = self._rhs is not None and self._rhs.shape == rhs.shape and torch.equal(self._rhs, rhs)
        if self.sharding.distributed:  # every rank passes the data (collectives) or none does
            same = not self.sharding.any(not same, rhs.device)
        if same:
            assert self._projected is not None and self._rhs_square is not None
            return self._projected, self._rhs_square
        C, G, t = self.problem.num_outputs, self.layout.num_groups, rhs.shape[-1]
        per_output = rhs.reshape(-1, C, t)  # shape: (N, C, t)
        projected = torch.zeros(C, G, self.inducing_size, t, dtype=torch.float64, device=rhs.device)
        first = not self._phi_ready  # the first pass also accumulates Phi and the traces
        for start, xc in self.network.chunks(self.problem.x, self._chunk_rows(), desc="inducing pass"):
            products = self.chunk_products(xc, blocks=first)
            cross = products.cross.reshape(G, xc.num, C, -1)  # shape: (G, n, C, MC)
            projected += torch.einsum("gncm,nct->cgmt", cross, per_output[start : start + xc.num])
            if first:
                assert products.blocks is not None
                self.traces += products.blocks.diagonal(dim1=-2, dim2=-1).sum(1).T
                for c in range(C):
                    self._add_outer(self.phi[c], cross[:, :, c])
        if first:
            self.sharding.sum_(self.phi)
            self.sharding.sum_(self.traces)
        self._phi_ready = True
        self._rhs, self._projected = rhs.clone(), self.sharding.sum_(projected)
        self._rhs_square = self.sharding.sum_(per_output.square().sum(0))
        return projected, self._rhs_square

    def _pieces(self, delta: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(K_ZZ, Phi(delta, S), 1/sigma_c^2)``."""
        if not self._phi_ready:  # no right-hand side seen yet: accumulate Phi with a zero one
            self._projections(torch.zeros(self.size, 1, dtype=torch.float64, device=self.network.device))
        precision = self._output_noise(noise).reciprocal()
        return self._kzz(delta), self._phi(delta, precision), precision

    def _projected_rhs(self, delta: Tensor, precision: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`K_{ZX} S^{-1} r` ``(MC, t)`` and :math:`r^\top S^{-1} r` ``(t,)``."""
        projected, square = self._projections(rhs)
        inv = delta.to(torch.float64).reciprocal()
        return torch.einsum("c,g,cgmt->mt", precision, inv, projected), precision @ square

    # -------------------------------------------------------------- interface
    def inv_quad_logdet(self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool) -> tuple[Tensor, Tensor]:
        r""":math:`r^\top (Q + S)^{-1} r` and :math:`\log|Q + S|` (Woodbury / determinant lemma)."""
        if rhs is not None:
            self._projections(rhs)  # first call: one data pass for Phi and the projection together
        kzz, phi, precision = self._pieces(delta, noise)
        lz, a, lb = self._factors(kzz, phi)
        zero = torch.zeros((), dtype=torch.float64, device=kzz.device)
        inv_quad = zero
        if rhs is not None:
            b, square = self._projected_rhs(delta, precision, rhs)
            w = torch.linalg.solve_triangular(lb, torch.linalg.solve_triangular(lz, b, upper=False), upper=False)
            inv_quad = square - w.square().sum(0)
        log_det = zero
        if logdet:
            n = self.problem.total_data
            log_det = self._log_det_ratio(lb) - n * precision.log().sum()
        # the trace term from the same factorization, for the correction() call that follows
        self._stash = (self._key(delta, precision), self._trace_term(delta, precision, a))
        return inv_quad, log_det

    @staticmethod
    def _key(delta: Tensor, precision: Tensor) -> tuple[Tensor, Tensor, bool]:
        return delta.detach().clone(), precision.detach().clone(), torch.is_grad_enabled()

    def _trace_term(self, delta: Tensor, precision: Tensor, a: Tensor) -> Tensor:
        trace_k = torch.einsum("c,g,cg->", precision, delta.to(torch.float64).reciprocal(), self.traces)
        return -0.5 * (trace_k - a.diagonal().sum())  # tr(A) = tr(K_ZZ^-1 Phi) = tr(S^-1 Q)

    def correction(self, delta: Tensor, noise: Tensor | None) -> Tensor:
        r"""The collapsed bound's :math:`-\tfrac12\operatorname{tr}(S^{-1}(K - Q))`."""
        assert noise is not None
        precision = self._output_noise(noise).reciprocal()
        stash, self._stash = self._stash, None
        if stash is not None:  # computed by the inv_quad_logdet of this same evaluation: reuse it
            (old_delta, old_precision, grad), term = stash
            if (
                grad == torch.is_grad_enabled()
                and torch.equal(old_delta, delta.detach())
                and torch.equal(old_precision, precision.detach())
            ):
                return term
        kzz, phi, precision = self._pieces(delta, noise)
        return self._trace_term(delta, precision, self._factors(kzz, phi)[1])

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> InducingPosterior:
        delta, noise = delta.detach(), noise.detach()
        self._projections(residual.reshape(-1, 1))
        kzz, phi, precision = self._pieces(delta, noise)
        lz, ld = self._predictive_factors(kzz, phi)
        b, _ = self._projected_rhs(delta, precision, residual.reshape(-1, 1))
        if self.mean == "network":
            return self._posterior(delta, lz, ld, self.network.flat_params.to(torch.float64))
        coef = cholesky_solve(b, ld)  # D^{-1} K_ZX S^{-1} r, shape: (MC, 1)
        return self._posterior(delta, lz, ld, self._weights(delta, coef[:, 0]))

    def _weights(self, delta: Tensor, coef: Tensor) -> Tensor:
        r""":math:`\bar\theta = P_0^{-1} J_Z^\top c` for coefficients ``c`` ``(MC,)``."""
        cot = coef.reshape(1, self.z.num, self.problem.num_outputs)
        return pullback(self.ntk, self.z, cot, scale=delta.to(torch.float64).reciprocal())[0]
