r"""Inducing-point (SGPR / Titsias) solvers: the NTK GP with ``M`` inducing inputs among the data.

With inducing inputs :math:`Z` (``M`` training points, all ``C`` outputs each) the kernel on the
data is replaced by its Nystrom approximation :math:`Q = K_{XZ} K_{ZZ}^{-1} K_{ZX}`.

**Gaussian likelihood** (noise :math:`S`, one variance per output): the hyperparameter
objective is Titsias' collapsed lower bound on the exact log evidence,

.. math::
    \mathcal L = \log\mathcal N(r \mid 0, Q + S) - \tfrac12\operatorname{tr}\big(S^{-1}(K - Q)\big)
    \le \log p(y \mid \delta, S),

and the predictive is the optimal variational posterior (DTC form with the exact prior at the
test points):

.. math::
    \mu_* = m_* + K_{*Z} D^{-1} K_{ZX} S^{-1} r,\qquad
    \Sigma_{**} = K_{**} - K_{*Z}\big(K_{ZZ}^{-1} - D^{-1}\big)K_{Z*},\qquad
    D = K_{ZZ} + K_{ZX} S^{-1} K_{XZ}.

**Laplace likelihoods** (per-point GGN blocks :math:`\Lambda = BB^\top` at the MAP): the same
construction with :math:`S^{-1}` replaced by :math:`\Lambda`. The Laplace evidence's log
determinant is replaced by

.. math::
    \log|I + B^\top Q B| + \operatorname{tr}\big(B^\top (K - Q) B\big) \;\ge\; \log|I + B^\top K B|

(concavity of :math:`\log\det`), so the approximate Laplace evidence is a lower bound on the
exact one, tight when :math:`Q = K`; the predictive covariance is as above with
:math:`D = K_{ZZ} + K_{ZX}\Lambda K_{XZ}` and the mean is :math:`f(x_*;\hat\theta)`.

**Caches** (one pass over the data at construction; nothing after depends on ``N``): per-group
:math:`K^g_{ZZ}` ``(G, MC, MC)``, :math:`\Phi^{(c)}_{gh} = K^g_{Z X_c} W K^h_{X_c Z}` ``(C', G, G,
MC, MC)`` (``C' = C`` Gaussian outputs with their own noise, weights :math:`W = I`; one Laplace
block with :math:`W = \Lambda`), :math:`K^g_{Z X_c} r_c` and the per-group traces. The bound, its
gradients in :math:`\delta` and :math:`S`, and the posterior then cost :math:`O(G^2 (MC)^2 +
(MC)^3)`: hyperparameter fitting is independent of ``N``. Building them costs
:math:`O(G^2 N C (MC)^2)` flops and ``G`` cross-Grams per data chunk. Prediction costs one
structured cross-Gram against :math:`Z` and :math:`O((MC)^2)` per test point.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ntkgp.cholesky import NotPositiveDefiniteError, cholesky, cholesky_solve
from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import _generic_gram, ntk_gram, ntk_gram_diagonal, structured_gram
from ntkgp.inducing.selection import DEFAULT_POOL_SIZE, select_inducing_points
from ntkgp.memory import check_fits
from ntkgp.parameter_groups import ParameterGroups
from ntkgp.solvers.base import EvidenceOnlyGaussianSolver, LaplaceSolver, Posterior, SolverBase, SolverSpec
from ntkgp.solvers.kernel_space import apply_factor_transpose
from ntkgp.solvers.test_kernel import DowndatePosterior, TestKernel

__all__ = ["Inducing", "InducingLaplaceSolver", "InducingPosterior", "InducingSolver"]

#: extra jitters, in units of the mean diagonal of K_ZZ, tried in turn when I + A is indefinite
_EXTRA_JITTER = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


@dataclass
class Inducing(SolverSpec):
    r"""Inducing-point route: ``LinearizedGP(..., solver=ntkgp.solvers.Inducing(num_inducing=500))``.

    Parameters
    ----------
    num_inducing:
        ``M``, the number of inducing points (each carries all ``C`` outputs).
    selection:
        ``"kmeans"`` (default: k-means on the inputs, centres snapped to training points),
        ``"pivoted_cholesky"`` (greedy on the NTK at the initial prior precisions, over a pool of
        ``pool_size`` kernel rows), ``"random"``, or an index tensor. On Friedman-1 (N = 10,000,
        the 8-256-256-1 MLP) k-means gave the tightest bound and the best test NLL at M = 100,
        300 and 1000; greedy pivoting favours points of large prior variance (extremes), which
        helped neither.
    mean:
        Gaussian predictive mean: ``"posterior"`` (default; the SGPR mean
        :math:`m_* + K_{*Z}D^{-1}K_{ZX}S^{-1}r`) or ``"network"`` (:math:`f(x_*;\hat\theta)`, the
        exact posterior mean when the network is a MAP for the same :math:`\delta, \sigma`; the
        Laplace convention, as laplace-torch uses, and much better than the SGPR mean at small
        ``M``). Laplace likelihoods always use the network.
    prior_residual:
        ``True`` (default) keeps the SGPR/DTC predictive above, with the exact prior variance
        :math:`K_{**} - Q_{**}` in the directions the inducing Jacobians do not span. That makes it
        large at small ``M`` (115x the exact median variance at ``M = 100`` on Friedman-1), though
        it is not guaranteed to be above the exact variance everywhere. ``False`` drops that term
        and predicts with :math:`\Sigma_{**} = K_{*Z} D^{-1} K_{Z*}`, the subset-of-regressors
        (Nystrom) predictive: a Laplace posterior over the ``M C`` Nystrom features with all
        ``N`` points' curvature. It is never above the SGPR variance nor the exact one (it is
        exact in the span of the features, zero outside). For one output, with ELLA's own points
        as ``selection``, ``jitter=0`` and ``mean="network"``, it is laplace-torch's ``ELLA``
        (Deng et al. 2022) with ``n_eigenvalues = subsample_size``; for ``C > 1`` ELLA keeps one
        random output per point, ntkgp all ``C``. Only the predictive changes; the evidence is
        the collapsed bound either way.
    pool_size:
        Candidates for the pivoted-Cholesky search.
    jitter:
        Added to the diagonal of :math:`K_{ZZ}` relative to its mean diagonal (``1e-8``). The
        NTK Gram of ``M`` points is singular when ``M C > P`` and ill-conditioned (condition
        numbers of 1e10 on small tanh MLPs) well before. A jitter keeps the bound a lower bound
        (:math:`Q` only shrinks) and limits the round-off amplification to about
        ``1e-16 / jitter``.
    generator:
        Random source for the selection.
    """

    num_inducing: int = 500
    selection: str | Tensor = "kmeans"
    pool_size: int = DEFAULT_POOL_SIZE
    jitter: float = 1e-8
    generator: torch.Generator | None = None
    mean: str = "posterior"
    prior_residual: bool = True

    def __post_init__(self) -> None:
        self._check_choice("mean", ("posterior", "network"))

    def _indices(self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int) -> Tensor:
        return select_inducing_points(self.selection, network, groups, x, self.num_inducing, budget=budget,
                                      pool_size=self.pool_size, generator=self.generator)

    def gaussian(self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int) -> InducingSolver:
        return InducingSolver(network, groups, x, budget, self._indices(network, groups, x, budget), self.jitter,
                              mean=self.mean, prior_residual=self.prior_residual)

    def laplace(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, hessian_factor: Tensor
    ) -> InducingLaplaceSolver:
        return InducingLaplaceSolver(network, groups, x, budget, self._indices(network, groups, x, budget),
                                     self.jitter, hessian_factor, prior_residual=self.prior_residual)


class _InducingCaches(SolverBase):
    r"""What both inducing solvers cache: :math:`K^g_{ZZ}`, :math:`\Phi_{gh}` and traces."""

    exact = False

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, indices: Tensor,
        jitter: float, blocks: int, prior_residual: bool,
    ) -> None:
        super().__init__(network, groups, x, budget)
        C, G = network.num_outputs, groups.num_groups
        #: whether the predictive keeps :math:`K_{**} - Q_{**}` (SGPR) or drops it (subset of regressors)
        self.prior_residual = prior_residual
        #: indices of the inducing points in the training inputs, ``(M,)``
        self.indices = indices.to(x.device)
        #: inducing inputs :math:`Z` ``(M, D)``
        self.z = x[self.indices]
        self.jitter = jitter
        mc = self.z.shape[0] * C
        check_fits(8 * (blocks * G * G + G + 4) * mc * mc,
                   f"the inducing-point caches ({blocks} x {G}^2 + {G} matrices of {mc} x {mc}); use fewer "
                   "inducing points or fewer prior groups", network.device)
        #: per-group :math:`K^g_{ZZ}` ``(G, MC, MC)``, float64
        self.kzz = ntk_gram(network, groups, self.z, budget=budget)
        #: :math:`\Phi` ``(blocks, G, G, MC, MC)``, float64
        self.phi = torch.zeros(blocks, G, G, mc, mc, dtype=torch.float64, device=network.device)
        self._z_factors = network.structured_factors(self.z) if network.structured_layers else []

    @property
    def inducing_size(self) -> int:
        """``M C``."""
        return self.kzz.shape[-1]

    def _chunk_rows(self) -> int:
        G, C = self.groups.num_groups, self.network.num_outputs
        return max(1, self.budget // (4 * 8 * G * C * self.inducing_size))

    def _cross(self, xc: Tensor) -> Tensor:
        """Per-group :math:`K^g(x_c, Z)`, ``(G, n C, M C)``, float64."""
        network = self.network
        out = torch.zeros(self.groups.num_groups, xc.shape[0] * network.num_outputs, self.inducing_size,
                          dtype=torch.float64, device=network.device)
        if network.structured_layers:
            structured_gram(network, self.groups, network.structured_factors(xc), self._z_factors, out)
        if network.generic_tensors:
            _generic_gram(network, self.groups, xc, self.z, out, self.budget, network.generic_tensors)
        return out

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
        kzz = torch.einsum("g,gij->ij", delta.to(torch.float64).reciprocal(), self.kzz)
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


class InducingSolver(_InducingCaches, EvidenceOnlyGaussianSolver):
    """The collapsed (Titsias) bound and SGPR posterior for a Gaussian likelihood."""

    name = "inducing"

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, indices: Tensor,
        jitter: float = 1e-8, *, mean: str = "posterior", prior_residual: bool = True,
    ) -> None:
        C, G = network.num_outputs, groups.num_groups
        super().__init__(network, groups, x, budget, indices, jitter, blocks=C, prior_residual=prior_residual)
        #: ``"posterior"`` (SGPR mean) or ``"network"`` (the MAP network's outputs)
        self.mean = mean
        n = x.shape[0]
        #: per-group, per-output traces :math:`\sum_n K^g_{(n,c),(n,c)}`, ``(C, G)``
        self.traces = ntk_gram_diagonal(network, groups, x, budget=budget).reshape(G, n, C).sum(1).T.contiguous()
        self._rhs: Tensor | None = None  # the right-hand side whose projections are cached
        self._projected: Tensor | None = None  # (C, G, MC, t): K^g_{Z X_c} r_c
        self._rhs_square: Tensor | None = None  # (C, t): sum over points of r_c^2
        self._phi_ready = False  # Phi is accumulated in the same data pass as the first projection
        self._stash: tuple[tuple[Tensor, Tensor, bool], Tensor] | None = None

    # ----------------------------------------------------------------- noise
    def _output_noise(self, noise: Tensor) -> Tensor:
        """One noise variance per output, ``(C,)``; the bound needs noise constant over the data."""
        per_point = noise.reshape(-1, self.network.num_outputs)
        if not torch.equal(per_point.detach(), per_point[:1].detach().expand_as(per_point)):
            raise ValueError("the inducing-point solver needs noise that is the same for every data point "
                             "(one value per output); this likelihood's noise varies over the data")
        return per_point[0].to(torch.float64)

    def _projections(self, rhs: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`K^g_{Z X_c} r_c` ``(C, G, MC, t)`` and :math:`\sum_n r_{n,c}^2` ``(C, t)``, cached."""
        rhs = rhs.detach().to(torch.float64)
        if self._rhs is not None and self._rhs.shape == rhs.shape and torch.equal(self._rhs, rhs):
            assert self._projected is not None and self._rhs_square is not None
            return self._projected, self._rhs_square
        C, G, t = self.network.num_outputs, self.groups.num_groups, rhs.shape[-1]
        per_output = rhs.reshape(-1, C, t)  # shape: (N, C, t)
        projected = torch.zeros(C, G, self.inducing_size, t, dtype=torch.float64, device=rhs.device)
        for start, xc in self.network.chunks(self.x, self._chunk_rows(), desc="inducing pass"):
            cross = self._cross(xc).reshape(G, xc.shape[0], C, -1)  # shape: (G, n, C, MC)
            projected += torch.einsum("gncm,nct->cgmt", cross, per_output[start : start + xc.shape[0]])
            if not self._phi_ready:
                for c in range(C):
                    self._add_outer(self.phi[c], cross[:, :, c])
        self._phi_ready = True
        self._rhs, self._projected = rhs.clone(), projected
        self._rhs_square = per_output.square().sum(0)
        return projected, self._rhs_square

    def _pieces(self, delta: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(K_ZZ, Phi(delta, S), 1/sigma_c^2)``."""
        if not self._phi_ready:  # no right-hand side seen yet: accumulate Phi with a zero one
            self._projections(torch.zeros(self.size, 1, dtype=torch.float64, device=self.x.device))
        precision = self._output_noise(noise).reciprocal()
        return self._kzz(delta), self._phi(delta, precision), precision

    def _projected_rhs(self, delta: Tensor, precision: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`K_{ZX} S^{-1} r` ``(MC, t)`` and :math:`r^\top S^{-1} r` ``(t,)``."""
        projected, square = self._projections(rhs)
        inv = delta.to(torch.float64).reciprocal()
        return torch.einsum("c,g,cgmt->mt", precision, inv, projected), precision @ square

    # -------------------------------------------------------------- interface
    def inv_quad_logdet(
        self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool
    ) -> tuple[Tensor, Tensor]:
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
            n = self.x.shape[0]
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
            if (grad == torch.is_grad_enabled() and torch.equal(old_delta, delta.detach())
                    and torch.equal(old_precision, precision.detach())):
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
            return InducingPosterior(self, delta, lz, ld, self.network.flat_params.to(torch.float64))
        coef = cholesky_solve(b, ld)  # D^{-1} K_ZX S^{-1} r, shape: (MC, 1)
        return InducingPosterior(self, delta, lz, ld, self._weights(delta, coef[:, 0]))

    def _weights(self, delta: Tensor, coef: Tensor) -> Tensor:
        r""":math:`\bar\theta = P_0^{-1} J_Z^\top c` for coefficients ``c`` ``(MC,)``."""
        cot = coef.reshape(1, self.z.shape[0], self.network.num_outputs)
        pulled = self.network.vjp(self.z, cot).to(torch.float64)
        return self.groups.scale_tangents(pulled, delta.to(torch.float64).reciprocal(), self.network.offsets)[0]


class InducingLaplaceSolver(_InducingCaches, LaplaceSolver):
    r"""The inducing-point Laplace GP: :math:`\log|I + B^\top Q B| + \operatorname{tr}(B^\top(K-Q)B)`."""

    name = "inducing"

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, indices: Tensor,
        jitter: float, hessian_factor: Tensor, *, prior_residual: bool = True,
    ) -> None:
        super().__init__(network, groups, x, budget, indices, jitter, blocks=1, prior_residual=prior_residual)
        self.hessian_factor = hessian_factor
        G = groups.num_groups
        for start, xc in network.chunks(x, self._chunk_rows(), desc="inducing caches"):
            factor = hessian_factor[start : start + xc.shape[0]]
            cross = self._cross(xc)
            left = torch.stack([apply_factor_transpose(factor, cross[g]) for g in range(G)])
            self._add_outer(self.phi[0], left)
        #: per-group :math:`\operatorname{tr}(B^\top K^g B)`, ``(G,)``
        self.traces = self._laplace_traces()

    def _laplace_traces(self) -> Tensor:
        network, G = self.network, self.groups.num_groups
        out = torch.zeros(G, dtype=torch.float64, device=network.device)
        for g in range(G):  # one-hot prior variances select group g
            one_hot = torch.full((G,), float("inf"), dtype=torch.float64, device=network.device)
            one_hot[g] = 1.0
            kernel = TestKernel(network, self.groups, one_hot, None, self.budget)
            for start, xc in network.chunks(self.x, kernel.rows(0), desc="inducing traces"):
                blocks = kernel.parts(xc, full=False)[0]  # shape: (n, C, C)
                b = self.hessian_factor[start : start + xc.shape[0]].to(torch.float64)
                out[g] += torch.einsum("nca,ncd,nda->", b, blocks, b)
        return out

    def _pieces(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        one = torch.ones(1, dtype=torch.float64, device=delta.device)
        return self._kzz(delta), self._phi(delta, one)

    def log_det(self, delta: Tensor) -> Tensor:
        r""":math:`\log|I + B^\top Q B| = \log|D| - \log|K_{ZZ}|`, differentiable."""
        return self._log_det_ratio(self._factors(*self._pieces(delta))[2])

    def correction(self, delta: Tensor, noise: Tensor | None) -> Tensor:
        r""":math:`-\tfrac12\operatorname{tr}(B^\top(K - Q)B)`: makes the evidence a lower bound."""
        a = self._factors(*self._pieces(delta))[1]  # tr(A) = tr(K_ZZ^-1 Phi) = tr(B^T Q B)
        return -0.5 * (delta.to(torch.float64).reciprocal() @ self.traces - a.diagonal().sum())

    @torch.no_grad()
    def laplace_posterior(self, delta: Tensor) -> Posterior:
        delta = delta.detach()
        lz, ld = self._predictive_factors(*self._pieces(delta))
        return InducingPosterior(self, delta, lz, ld, self.network.flat_params.to(torch.float64))


class InducingPosterior(DowndatePosterior):
    r"""Covariance :math:`K_{**} - \lVert L_Z^{-1}K_{Z*}\rVert^2 + \lVert L_D^{-1}K_{Z*}\rVert^2`.

    That is :math:`K_{**} - K_{*Z}(K_{ZZ}^{-1} - D^{-1})K_{Z*}` with two triangular solves per
    test block (:math:`O((MC)^2)` per test point) after one structured cross-Gram against the
    ``M`` inducing inputs; no eigendecomposition. Without the prior residual (subset of
    regressors) only :math:`\lVert L_D^{-1}K_{Z*}\rVert^2` remains: one solve.
    """

    def __init__(self, solver: _InducingCaches, delta: Tensor, lz: Tensor, ld: Tensor, weights: Tensor) -> None:
        super().__init__(solver.network, solver.groups, weights, solver.budget, delta, solver.z,
                         (2 if solver.prior_residual else 1) * lz.shape[-1], prior_residual=solver.prior_residual)
        #: Cholesky factors of :math:`K_{ZZ}` and :math:`D`, ``(MC, MC)``
        self.lz, self.ld = lz, ld

    def downdate(self, x: Tensor, cross: Tensor | None) -> Tensor:
        assert cross is not None
        return torch.linalg.solve_triangular(self.lz, cross, upper=False)

    def update(self, x: Tensor, cross: Tensor | None) -> Tensor:
        assert cross is not None
        return torch.linalg.solve_triangular(self.ld, cross, upper=False)
