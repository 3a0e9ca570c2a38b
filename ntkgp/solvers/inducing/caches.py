r"""What both inducing-point solvers cache: :math:`K^g_{ZZ}`, :math:`\Phi_{gh}` and traces, and the
factorizations of functions of :math:`\delta` built from them (see :mod:`ntkgp.solvers.inducing`)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ntkgp.errors import NotPositiveDefiniteError
from ntkgp.linalg.cholesky import cholesky
from ntkgp.memory import check_fits
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import NTKProblem, captures, gram
from ntkgp.ntk.captures import captures_fit, rows_within
from ntkgp.ntk.generic import generic_rows
from ntkgp.ntk.reference import ChunkProducts, ReferenceOperands, chunk_products, reference_bytes
from ntkgp.ntk.sharded import gather_points
from ntkgp.posteriors.inducing import InducingPosterior
from ntkgp.solvers.base import SolverBase
from ntkgp.structured.capture import UnitCapture

__all__ = ["InducingCaches"]

#: extra jitters, in units of the mean diagonal of K_ZZ, tried in turn when I + A is indefinite
_EXTRA_JITTER = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


class InducingCaches(SolverBase):
    r"""What both inducing solvers cache: :math:`K^g_{ZZ}`, :math:`\Phi_{gh}` and traces."""

    exact = False

    def __init__(
        self,
        problem: NTKProblem,
        indices: Tensor,
        jitter: float,
        blocks: int,
        prior_residual: bool,
    ) -> None:
        SolverBase.__init__(self, problem)
        C, G = problem.num_outputs, self.layout.num_groups
        network = self.network
        #: whether the predictive keeps :math:`K_{**} - Q_{**}` (SGPR) or drops it (subset of regressors)
        self.prior_residual = prior_residual
        #: indices of the inducing points in the training inputs, ``(M,)`` (with a process group: global)
        self.indices = indices.to(network.device)
        #: inducing inputs :math:`Z` (with a process group: gathered on every rank)
        self.z = gather_points(problem, self.indices)
        self.jitter = jitter
        mc = self.z.num * C
        check_fits(
            8 * (blocks * G * G + G + 4) * mc * mc,
            f"the inducing-point caches ({blocks} x {G}^2 + {G} matrices of {mc} x {mc}); use fewer "
            "inducing points or fewer prior groups",
            network.device,
        )
        #: per-group :math:`K^g_{ZZ}` ``(G, MC, MC)``, float64
        self.kzz = gram(self.ntk, self.z)
        #: :math:`\Phi` ``(blocks, G, G, MC, MC)``, float64
        self.phi = torch.zeros(blocks, G, G, mc, mc, dtype=torch.float64, device=network.device)
        rows = self._chunk_rows()
        #: the inducing inputs' operands (:mod:`ntkgp.ntk.reference`) when they fit in half the budget,
        #: else ``None`` and their captures when those fit (else they are recaptured per chunk)
        self._held: ReferenceOperands | None = None
        self._z_captures: list[UnitCapture] | None = None
        if reference_bytes(self.ntk, self.z, rows) <= problem.budget // 2:
            self._held = ReferenceOperands(self.ntk, self.z, rows)
        elif self.ntk.plan().units and captures_fit(self.ntk, self.z, problem.budget // 2):
            self._z_captures = captures(self.ntk, self.z)

    def _posterior(self, delta: Tensor, lz: Tensor, ld: Tensor, weights: Tensor) -> InducingPosterior:
        return InducingPosterior(self.ntk, weights, delta, self.z, lz, ld, prior_residual=self.prior_residual)

    @property
    def inducing_size(self) -> int:
        """``M C``."""
        return self.kzz.shape[-1]

    def _chunk_rows(self) -> int:
        G, C = self.layout.num_groups, self.problem.num_outputs
        rows = max(1, self.problem.budget // (4 * 8 * G * C * self.inducing_size))
        if self.ntk.plan().units:  # a chunk's captures are held too
            rows = min(rows, rows_within(self.ntk, self.problem.x, self.problem.budget // 4))
        if self.ntk.plan().generic:  # and its generic Jacobian
            rows = min(rows, generic_rows(self.ntk, self.ntk.plan().generic))
        return rows

    def chunk_products(self, xc: Inputs, *, blocks: bool) -> ChunkProducts:
        """Per-group :math:`K^g(x_c, Z)` ``(G, n C, M C)`` and (``blocks``) the per-group per-point blocks
        :math:`K^g(x_n, x_n)` ``(G, n, C, C)`` of a chunk of training inputs, float64, from one capture pass."""
        return chunk_products(self.ntk, xc, self.z, blocks=blocks, held=self._held, reference_captures=self._z_captures)

    @staticmethod
    def _add_outer(phi: Tensor, left: Tensor) -> None:
        """``phi[g, h] += left[g]^T left[h]`` for ``left`` ``(G, n, MC)``; upper triangle, mirrored."""
        G = left.shape[0]
        for g in range(G):
            for h in range(g, G):
                prod = left[g].T @ left[h]
                phi[g, h] += prod
                if h != g:
                    phi[h, g] += prod.T

    # --------------------------------------------------------- functions of delta
    def _kzz(self, delta: Tensor) -> Tensor:
        kzz = self.layout.weighted(delta.to(torch.float64).reciprocal(), self.kzz)
        scale = kzz.diagonal().mean().detach()
        return kzz + (self.jitter * scale) * torch.eye(kzz.shape[0], dtype=kzz.dtype, device=kzz.device)

    def _phi(self, delta: Tensor, weights: Tensor) -> Tensor:
        """:math:`\\sum_c w_c \\sum_{gh} \\Phi^{(c)}_{gh} / (\\delta_g \\delta_h)`, ``(MC, MC)``."""
        inv = delta.to(torch.float64).reciprocal()
        return torch.einsum("c,g,h,cghij->ij", weights, inv, inv, self.phi)

    def _factors(self, kzz: Tensor, phi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`L_Z` (Cholesky of :math:`K_{ZZ}`), :math:`A = L_Z^{-1}\Phi L_Z^{-\top}` and
        :math:`L_B` (Cholesky of :math:`B = I + A`).

        :math:`D = L_Z B L_Z^\top`, so :math:`\log|D| - \log|K_{ZZ}| = \log|B|` without the
        cancellation of two large log-determinants when :math:`K_{ZZ}` is ill-conditioned.

        :math:`\Phi = K_{ZX}S^{-1}K_{XZ}` carries rounding errors of about
        :math:`\epsilon\lVert\Phi\rVert`, which :math:`L_Z^{-1}` amplifies by the inverse of
        :math:`K_{ZZ}`'s smallest eigenvalue. When that leaves :math:`I + A` indefinite (many
        inducing points on a smooth NTK, much data, little noise: seen at M = 4000,
        N = 200,000), :math:`K_{ZZ}` gets a larger jitter, 1e-7, 1e-6, ... up to 1e-2 times its
        mean diagonal, with a warning naming it. The result is still a lower bound and a consistent posterior:
        it is the collapsed bound for inducing variables observed with that small noise, for
        which :math:`Q \preceq K` still holds.
        """
        scale = kzz.diagonal().mean().detach()
        eye = torch.eye(kzz.shape[0], dtype=kzz.dtype, device=kzz.device)
        for extra in _EXTRA_JITTER:
            lz = cholesky(kzz + (extra * scale) * eye if extra else kzz, what="K_ZZ, the NTK of the inducing points")
            half = torch.linalg.solve_triangular(lz, phi, upper=False)
            a = torch.linalg.solve_triangular(lz, half.T, upper=False)
            a = 0.5 * (a + a.T)
            lb, info = torch.linalg.cholesky_ex(a + eye)
            if not info.any():
                if extra:
                    warnings.warn(
                        f"K_ZZ of the {self.inducing_size} inducing rows is too ill-conditioned for I + "
                        f"L_Z^-1 Phi L_Z^-T to be numerically positive definite; added {extra:g} times its mean "
                        "diagonal to it (fewer inducing points, or a larger jitter, avoid this).",
                        stacklevel=4,
                    )
                return lz, a, lb
        raise NotPositiveDefiniteError(
            f"I + L_Z^-1 Phi L_Z^-T is not positive definite even with {_EXTRA_JITTER[-1]:g} times the mean "
            "diagonal added to K_ZZ; the kernel may have NaNs, or the noise is far too small"
        )

    @staticmethod
    def _log_det_ratio(lb: Tensor) -> Tensor:
        r""":math:`\log|B| = \log|D| - \log|K_{ZZ}|`."""
        return 2.0 * lb.diagonal().log().sum()

    @torch.no_grad()
    def _predictive_factors(self, kzz: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`L_Z` and :math:`L_D = L_Z L_B` (Cholesky factor of :math:`D`), no gradients."""
        lz, _, lb = self._factors(kzz, phi)
        return lz, lz @ lb
