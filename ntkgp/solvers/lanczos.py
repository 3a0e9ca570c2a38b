r"""Low-rank solvers from a block Lanczos decomposition of the NTK Gram (no dense kernel, no CG).

The operator decomposed is :math:`A = B^\top K(\delta) B`, ``(M, M)`` with ``M = N C``:

* Gaussian likelihood with one noise variance :math:`\sigma^2` for every row: :math:`B = I`,
  :math:`A = K`, and the noise is handled analytically;
* Laplace (non-Gaussian) likelihood: :math:`B` the per-point GGN factor, :math:`\Lambda = BB^\top`.

Block Lanczos (:func:`~ntkgp.linalg.block_lanczos`) on the lazy matvec
:math:`A V = B^\top J P_0^{-1} J^\top B V` (one batched vjp and one batched jvp per block, never an
``M x P`` Jacobian or an ``M x M`` matrix) gives the top ``k`` Ritz pairs :math:`A \approx U S U^\top`.

**Eigenvalues as functions of** :math:`\delta`. With :math:`c_{ig} = \lVert J_g^\top B u_i\rVert^2`
(one batched vjp of :math:`BU`),

.. math::
    s_i(\delta) = u_i^\top A(\delta) u_i = \sum_g c_{ig} / \delta_g .

At the :math:`\delta` of the decomposition these are the Ritz values; for one prior group they are
exact for every :math:`\delta` (the eigenvectors do not depend on it); for several groups their
gradient is the Hellmann-Feynman gradient. The decomposition is recomputed only when the direction
:math:`\delta/\delta_0` changes (never for one group), so values are always taken at a
decomposition point. There the gradients are those of the projected approximation
:math:`Q(\delta) = U\,(U^\top K(\delta) U)\,U^\top`: exact for the log-determinant from the
diagonal alone; for the quadratic form one extra vjp adds the off-diagonal part
(:meth:`LanczosSolver._rotation_gradient`). With ``k = N C`` all gradients are exact.

**Evidence.** Gaussian, with :math:`\lambda_i = s_i` and :math:`r` the residual:

.. math::
    \log|K + \sigma^2 I| \approx \sum_{i\le k}\log(\lambda_i + \sigma^2) + (M - k)\log\sigma^2,\qquad
    r^\top (K + \sigma^2 I)^{-1} r \approx \sum_{i\le k}\frac{(u_i^\top r)^2}{\lambda_i + \sigma^2}
    + \frac{\lVert r - U U^\top r\rVert^2}{\sigma^2},

i.e. the exact algebra of :math:`U \Lambda U^\top + \sigma^2 I` (the complement of :math:`U` is
treated as eigenvalue 0). Laplace: :math:`\log|I + B^\top K B| \approx \sum_{i\le k}\log(1 + s_i)`.

**Sign of the error.** Ritz values interlace from below (:math:`s_i \le \lambda_i(A)`) and the
dropped terms :math:`\log(1 + \lambda_i/\sigma^2)`, :math:`\log(1 + \lambda_i)` (``i > k``) are
non-negative, so both log-determinants are **lower bounds** of the exact ones: the
:math:`-\tfrac12\log|\cdot|` term of the evidence is over-estimated. The Gaussian data-fit term
:math:`r^\top(\cdot)^{-1}r` is an upper bound when the eigenvectors are converged
(:math:`U\Lambda U^\top \preceq K`), so the Gaussian evidence has no guaranteed sign; the Laplace
evidence (no data-fit term) is an upper bound. With ``k = N C`` both are exact.

**Posterior** (:class:`~ntkgp.solvers.low_rank_posterior.LowRankPosterior`), in weight space:

.. math::
    \Sigma_{**} = K_{**} - (J_* W)(J_* W)^\top,\qquad
    W = P_0^{-1} J^\top B U (I + S)^{-1/2}\;(P \times k).

Because :math:`U^\top A U = S` is diagonal, this equals
:math:`J_* P_0^{-1/2}(I + Z U U^\top Z^\top)^{-1} P_0^{-1/2} J_*^\top` with
:math:`Z = P_0^{-1/2} J^\top B`, and :math:`UU^\top \preceq I` makes it **conservative**: it never
under-estimates the exact predictive covariance, and the gap closes as the subspace grows
(exact at ``k = N C``). For the Gaussian case (:math:`B = \sigma^{-1} I`) it reads
:math:`K_{**} - K_{*X} U (\Lambda + \sigma^2 I)^{-1} U^\top K_{X*}`. Prediction costs one batched
jvp with ``k`` tangents per test block: ``O(k)`` per test point and output.
Posterior mean weights: Laplace :math:`\bar\theta = \hat\theta` (the MAP). Gaussian
:math:`\bar\theta = P_0^{-1} J^\top \alpha`, with (``mean=``)

* ``"projected"`` (default): :math:`\alpha = U(\Lambda + \sigma^2)^{-1}U^\top r`. With the covariance
  above this is the *exact* posterior of the linearized model given the projected data
  :math:`U^\top y` (a valid Gaussian posterior: mean and covariance agree); in the discarded
  directions it falls back to the prior mean, so a too-small rank costs accuracy gracefully. Mean
  error per discarded direction: first order, :math:`\lambda_i/(\lambda_i + \sigma^2)`.
* ``"complement"``: :math:`\alpha = U(\Lambda + \sigma^2)^{-1}U^\top r + (r - UU^\top r)/\sigma^2`, the
  low-rank solve used by the evidence (the complement taken as eigenvalue 0). Second-order
  accurate, :math:`\lambda_i^2/(\sigma^2(\lambda_i + \sigma^2))`, once every eigenvalue above the
  noise is kept, but it blows up (by :math:`\lambda_i/\sigma^2`) when the rank stops above the noise.

**Rank and accuracy.** The error of every quantity is governed by the discarded spectrum
:math:`\lambda_{k+1}, \lambda_{k+2}, \dots` of :math:`B^\top K B` relative to 1 (i.e. of :math:`K`
relative to :math:`\sigma^2`): the log-determinant misses
:math:`\sum_{i>k}\log(1 + \lambda_i/\sigma^2)` and the predictive variance over-estimates by at most
the prior variance along the discarded directions. NTK spectra decay fast, so ``k`` of a few
hundred usually captures all eigenvalues above the noise; a rank that stops above the noise level
shows as too large a predictive variance and too small a log-determinant.

Memory: the basis and its products, ``2 M m`` float64 numbers (``m`` the basis size, about
``2 k``), plus ``b P`` for one block's vjp; the posterior keeps :math:`W`, ``P k`` numbers.

Per-output (or per-point) Gaussian noise is not supported: it would make :math:`B = S^{-1/2}` depend
on the noise, so the decomposition would have to be redone at every noise value. Use a likelihood
with one noise variance (``GaussianLikelihood``) or an exact solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ntkgp.functional import FunctionalNetwork
from ntkgp.linalg.block_lanczos import block_lanczos
from ntkgp.memory import check_fits
from ntkgp.parameter_groups import ParameterGroups
from ntkgp.solvers.base import GaussianSolver, LaplaceSolver, SolverBase, SolverSpec
from ntkgp.solvers.kernel_space import apply_factor_transpose
from ntkgp.solvers.low_rank_posterior import LowRankPosterior
from ntkgp.structured_matvec import factor_kernel_matmul, supports_factor_matmul

__all__ = ["Lanczos", "LanczosDecomposition", "LanczosLaplaceSolver", "LanczosSolver"]


@dataclass(frozen=True)
class Lanczos(SolverSpec):
    r"""The Lanczos low-rank route: ``LinearizedGP(net, lik, x, y, solver=Lanczos(rank=200))``.

    Parameters
    ----------
    rank:
        ``k``, the number of eigenpairs of :math:`B^\top K B` kept (clipped to ``N C``; ``N C``
        is exact).
    block_size:
        Columns per Lanczos block, i.e. vjp/jvp tangents per step (default ``min(32, ceil(k/8))``).
        For a fixed basis size, smaller blocks mean more steps, a higher Krylov degree and more
        accurate eigenpairs; larger blocks batch the vjp/jvp better.
    num_steps:
        Lanczos steps; the Krylov basis has ``min(N C, num_steps * block_size)`` columns, each
        costing one NTK matvec. Default: the fewest steps giving at least ``2 k`` columns (and at
        least 2 steps). Must give at least ``k`` columns.
    seed:
        Seed of the CPU generator for the random start block (the result is reproducible).
    mean:
        Gaussian posterior mean: ``"projected"`` (default; the exact posterior given the data
        projected on the kept eigenvectors, graceful when the rank is too small) or
        ``"complement"`` (the evidence's low-rank solve; more accurate when every eigenvalue above
        the noise is kept, unstable otherwise), or ``"network"`` (:math:`f(x_*;\hat\theta)`, the
        exact posterior mean when the network is a MAP for the same :math:`\delta, \sigma`, as
        laplace-torch uses). See the module docstring.
    """

    rank: int
    block_size: int | None = None
    num_steps: int | None = None
    seed: int = 0
    mean: str = "projected"

    def __post_init__(self) -> None:
        for name in ("rank", "block_size", "num_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Lanczos {name} must be a positive integer, got {value!r}")
        self._check_choice("mean", ("projected", "complement", "network"))

    def settings(self, size: int) -> tuple[int, int, int]:
        """``(rank, block_size, num_steps)`` for an operator of side ``size`` ``= N C``."""
        rank = min(self.rank, size)
        block = min(self.block_size or min(32, -(-rank // 8)), size)
        steps = self.num_steps or max(2, -(-2 * rank // block))
        if min(size, steps * block) < rank:
            raise ValueError(
                f"Lanczos(rank={self.rank}, block_size={block}, num_steps={steps}) builds a basis of "
                f"{steps * block} columns, fewer than the rank {rank}; raise num_steps"
            )
        return rank, block, min(steps, -(-size // block))  # no more steps than fill the space

    def gaussian(self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int) -> LanczosSolver:
        return LanczosSolver(network, groups, x, budget, self)

    def laplace(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, hessian_factor: Tensor
    ) -> LanczosLaplaceSolver:
        return LanczosLaplaceSolver(network, groups, x, budget, self, hessian_factor)


# --------------------------------------------------------------------------- operator pieces
def apply_factor(hessian_factor: Tensor, rows: Tensor) -> Tensor:
    r""":math:`B R` for block-diagonal ``B`` (blocks ``(N, C, C)``) and ``R`` ``(N*C, t)``."""
    n, c, _ = hessian_factor.shape
    out = torch.einsum("nca,nak->nck", hessian_factor.to(rows.dtype), rows.reshape(n, c, -1))
    return out.reshape(n * c, -1)


def _pullback(network: FunctionalNetwork, x: Tensor, columns: Tensor, factor: Tensor | None) -> Tensor:
    r""":math:`(J^\top B V)^\top` for ``V`` ``(M, t)``: ``(t, P)``, float64 (``B = I`` without a factor)."""
    cot = columns if factor is None else apply_factor(factor, columns)
    cot = cot.T.reshape(columns.shape[1], x.shape[0], network.num_outputs)  # shape: (t, N, C)
    return network.vjp(x, cot).to(torch.float64)


def operator_matmul(
    network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, delta: Tensor, factor: Tensor | None,
    columns: Tensor, budget: int,
) -> Tensor:
    r""":math:`B^\top J P_0^{-1} J^\top B V` for ``V`` ``(M, t)``: one batched vjp, one batched jvp, or
    the factor form of :mod:`ntkgp.structured_matvec` (within ``budget`` bytes) when it pays."""
    t = columns.shape[1]
    if supports_factor_matmul(network, t):
        cot = columns if factor is None else apply_factor(factor, columns)
        cot = cot.T.reshape(t, x.shape[0], network.num_outputs)
        out = factor_kernel_matmul(network, groups, x, x, delta.to(torch.float64).reciprocal(), cot, budget)
    else:
        pulled = _pullback(network, x, columns, factor)  # shape: (t, P)
        scaled = groups.scale_tangents(pulled, delta.to(torch.float64).reciprocal(), network.offsets)
        out = network.jvp(x, scaled)  # shape: (t, N, C)
    out = out.reshape(out.shape[0], -1).T.to(torch.float64)  # shape: (M, t)
    return out if factor is None else apply_factor_transpose(factor, out)


def _group_norms(
    network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, factor: Tensor | None, vectors: Tensor,
    block: int,
) -> Tensor:
    r""":math:`c_{ig} = \lVert J_g^\top B u_i\rVert^2`, ``(k, G)``, float64, ``block`` vectors per vjp."""
    out = torch.zeros(vectors.shape[1], groups.num_groups, dtype=torch.float64, device=vectors.device)
    for start in range(0, vectors.shape[1], block):
        pulled = _pullback(network, x, vectors[:, start : start + block], factor)  # shape: (b, P)
        for g, a, b in groups.column_ranges(network.offsets):
            out[start : start + block, g] += pulled[:, a:b].square().sum(-1)
    return out


@dataclass
class LanczosDecomposition:
    r"""Top-``k`` eigenpairs of :math:`B^\top K(\delta_0) B` and their per-group weights.

    Attributes
    ----------
    direction:
        :math:`\delta_0 / \delta_{0,0}` ``(G,)``: the decomposition holds for every multiple of it.
    vectors:
        :math:`U` ``(M, k)``, orthonormal, float64.
    group_norms:
        :math:`c_{ig}` ``(k, G)``, float64; the eigenvalues are :math:`s(\delta) = c\,\delta^{-1}`.
    ritz_values:
        The Ritz values at :math:`\delta_0` ``(k,)`` (diagnostics).
    delta:
        :math:`\delta_0` ``(G,)``.
    """

    direction: Tensor
    vectors: Tensor
    group_norms: Tensor
    ritz_values: Tensor
    delta: Tensor

    def eigenvalues(self, delta: Tensor) -> Tensor:
        r""":math:`s_i(\delta) = \sum_g c_{ig}/\delta_g` ``(k,)``, differentiable in ``delta``."""
        return self.group_norms @ delta.to(torch.float64).reciprocal()


class _LanczosBase(SolverBase):
    """The decomposition cache shared by the Gaussian and the Laplace Lanczos solvers."""

    name = "lanczos"
    exact = False

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, spec: Lanczos,
        hessian_factor: Tensor | None,
    ) -> None:
        super().__init__(network, groups, x, budget)
        self.spec = spec
        self.rank, self.block_size, self.num_steps = spec.settings(self.size)
        #: Laplace: per-point :math:`B` ``(N, C, C)``, float64; Gaussian: ``None`` (:math:`B = I`)
        self.hessian_factor = None if hessian_factor is None else hessian_factor.to(torch.float64)
        self._decomposition: LanczosDecomposition | None = None
        #: how many decompositions have been computed (diagnostics)
        self.num_decompositions = 0

    def decomposition(self, delta: Tensor) -> LanczosDecomposition:
        """The decomposition valid at ``delta``, recomputed only when ``delta``'s direction changes."""
        delta = delta.detach().to(torch.float64)
        direction = delta / delta[0]
        cached = self._decomposition
        if cached is not None and torch.allclose(cached.direction, direction, rtol=1e-12, atol=0.0):
            return cached
        self._decomposition = self._decompose(delta, direction)
        self.num_decompositions += 1
        return self._decomposition

    @torch.no_grad()
    def _decompose(self, delta: Tensor, direction: Tensor) -> LanczosDecomposition:
        network, groups, factor = self.network, self.groups, self.hessian_factor
        generator = torch.Generator().manual_seed(self.spec.seed)
        ritz, vectors = block_lanczos(
            lambda v: operator_matmul(network, groups, self.x, delta, factor, v, self.budget),
            self.size, self.rank, block_size=self.block_size, num_steps=self.num_steps, generator=generator,
            device=network.device, progress=network.progress,
        )
        norms = _group_norms(network, groups, self.x, factor, vectors, self.block_size)
        return LanczosDecomposition(direction.clone(), vectors, norms, ritz, delta.clone())

    def directions(self, delta: Tensor, columns: Tensor, scale: Tensor) -> Tensor:
        r""":math:`P_0^{-1} J^\top B V \operatorname{diag}(\text{scale})`, ``(P, t)``, float64."""
        out = torch.zeros(self.network.num_parameters, columns.shape[1], dtype=torch.float64,
                          device=columns.device)
        inv_delta = delta.to(torch.float64).reciprocal()
        for start in range(0, columns.shape[1], self.block_size):
            sl = slice(start, start + self.block_size)
            pulled = _pullback(self.network, self.x, columns[:, sl], self.hessian_factor)  # shape: (b, P)
            pulled = self.groups.scale_tangents(pulled, inv_delta, self.network.offsets)
            out[:, sl] = (pulled * scale[sl, None]).T
        return out


class LanczosSolver(_LanczosBase, GaussianSolver):
    r"""Gaussian likelihood: :math:`K + \sigma^2 I \approx U \Lambda(\delta) U^\top + \sigma^2 I`.

    Every method refers to that approximation (the contract of an inexact
    :class:`~ntkgp.solvers.base.GaussianSolver`): solves, log-determinant, products, the diagonal
    and the dense matrix are those of :math:`U\Lambda U^\top + \sigma^2 I`. See the module docstring.
    """

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, spec: Lanczos
    ) -> None:
        super().__init__(network, groups, x, budget, spec, None)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _scalar_noise(noise: Tensor) -> Tensor:
        """The one noise variance :math:`\\sigma^2` (0-d, differentiable) of ``noise`` ``(M,)``."""
        flat = noise.reshape(-1).to(torch.float64)
        if not torch.equal(flat.detach(), flat.detach()[:1].expand_as(flat)):
            raise NotImplementedError(
                "the Lanczos solver needs one noise variance for every training output "
                "(e.g. GaussianLikelihood); this likelihood's noise varies over data points or outputs. "
                "Use an exact solver ('kernel' / 'weight') for it."
            )
        return flat[0]

    def _spectrum(self, delta: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`U` ``(M, k)``, :math:`\lambda(\delta)` ``(k,)`` and :math:`\sigma^2`, differentiable."""
        sigma2 = self._scalar_noise(noise)
        dec = self.decomposition(delta)
        return dec.vectors, dec.eigenvalues(delta), sigma2

    @staticmethod
    def _low_rank_solve(vectors: Tensor, eig: Tensor, sigma2: Tensor, rhs: Tensor) -> Tensor:
        r""":math:`U(\Lambda + \sigma^2)^{-1}U^\top R + (R - UU^\top R)/\sigma^2` for ``R`` ``(M, t)``."""
        proj = vectors.T @ rhs  # shape: (k, t)
        rest = rhs - vectors @ proj
        return vectors @ (proj / (eig + sigma2)[:, None]) + rest / sigma2

    # ------------------------------------------------------------ the contract
    def inv_quad_logdet(
        self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool
    ) -> tuple[Tensor, Tensor]:
        vectors, eig, sigma2 = self._spectrum(delta, noise)
        zero = torch.zeros((), dtype=torch.float64, device=vectors.device)
        inv_quad, log_det = zero, zero
        if rhs is not None:
            rhs = rhs.to(torch.float64)
            proj = vectors.T @ rhs  # shape: (k, t)
            rest = (rhs - vectors @ proj).square().sum(0)  # shape: (t,), outside span(U)
            inv_quad = (proj.square() / (eig + sigma2)[:, None]).sum(0) + rest / sigma2
            if self.groups.num_groups > 1 and torch.is_grad_enabled() and delta.requires_grad:
                coefficients = (proj / (eig + sigma2)[:, None]).detach()  # shape: (k, t)
                inv_quad = inv_quad + self._rotation_gradient(delta, vectors, coefficients)
        if logdet:
            log_det = (eig + sigma2).log().sum() + (self.size - eig.shape[0]) * sigma2.log()
        return inv_quad, log_det

    def _rotation_gradient(self, delta: Tensor, vectors: Tensor, coefficients: Tensor) -> Tensor:
        r"""A zero-valued term ``(t,)`` that completes the ``delta`` gradient of the quadratic form.

        The approximation is :math:`Q(\delta) = U T(\delta) U^\top` with
        :math:`T(\delta) = U^\top K(\delta) U = \sum_g C_g/\delta_g`, diagonal (:math:`\Lambda`) at the
        decomposition point but not at nearby :math:`\delta` when ``G > 1``. The exact gradient of
        :math:`r^\top(Q + \sigma^2)^{-1}r` there is :math:`a^\top C_g a/\delta_g^2`,
        :math:`a = (\Lambda + \sigma^2)^{-1}U^\top r`, and
        :math:`a^\top C_g a = \lVert J_g^\top U a\rVert^2` (one vjp); the diagonal formula gives only
        :math:`\sum_i a_i^2 c_{ig}/\delta_g^2`. This term adds the difference (the log-determinant
        needs none: its gradient is the trace, which sees only the diagonal of :math:`dT`).
        """
        dec = self.decomposition(delta)
        pulled = _pullback(self.network, self.x, vectors @ coefficients, None)  # shape: (t, P)
        full = torch.zeros(coefficients.shape[1], self.groups.num_groups, dtype=torch.float64,
                           device=pulled.device)
        for g, a, b in self.groups.column_ranges(self.network.offsets):
            full[:, g] += pulled[:, a:b].square().sum(-1)  # shape: (t, G), a^T C_g a
        diagonal = coefficients.square().T @ dec.group_norms  # shape: (t, G), sum_i a_i^2 c_ig
        term = -((full - diagonal) @ delta.to(torch.float64).reciprocal())
        return term - term.detach()

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        vectors, eig, sigma2 = self._spectrum(delta, noise)
        return self._low_rank_solve(vectors, eig, sigma2, rhs.to(torch.float64))

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        M = self.size
        check_fits(8 * 2 * M * M, f"the dense low-rank kernel ({M} x {M})", self.network.device)
        vectors, eig, _ = self._spectrum(delta, noise)
        return (vectors * eig) @ vectors.T + torch.diag_embed(noise.to(torch.float64))

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        with torch.no_grad():
            vectors, eig, _ = self._spectrum(delta, noise)
            rhs = rhs.to(torch.float64)
            return vectors @ (eig[:, None] * (vectors.T @ rhs)) + noise.to(torch.float64)[:, None] * rhs

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        vectors, eig, _ = self._spectrum(delta, noise)
        return vectors.square() @ eig + noise.to(torch.float64)

    def bilinear_derivative(
        self, delta: Tensor, noise: Tensor, left: Tensor, right: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""Gradients of :math:`\sum_t l_t^\top (U T(\delta) U^\top + S) r_t` (see
        :meth:`_rotation_gradient`): :math:`-\sum_t (J_g^\top UU^\top l_t)\cdot(J_g^\top UU^\top r_t)/\delta_g^2`
        (two vjps) and :math:`l \odot r`."""
        vectors = self.decomposition(delta).vectors
        left, right = left.to(torch.float64), right.to(torch.float64)
        pulled_left = _pullback(self.network, self.x, vectors @ (vectors.T @ left), None)  # shape: (t, P)
        pulled_right = _pullback(self.network, self.x, vectors @ (vectors.T @ right), None)
        products = (pulled_left * pulled_right).sum(0)  # shape: (P,)
        per_group = torch.zeros(self.groups.num_groups, dtype=torch.float64, device=products.device)
        for g, a, b in self.groups.column_ranges(self.network.offsets):
            per_group[g] += products[a:b].sum()
        grad_delta = -per_group / delta.detach().to(torch.float64).square()
        return grad_delta.to(delta.dtype), (left * right).sum(-1).to(noise.dtype)

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> LowRankPosterior:
        r"""Weights :math:`\bar\theta = P_0^{-1}J^\top\alpha` (:math:`\alpha` per ``spec.mean``, see
        the module docstring); :math:`W = P_0^{-1} J^\top U (\Lambda + \sigma^2)^{-1/2}`."""
        delta, noise = delta.detach(), noise.detach()
        vectors, eig, sigma2 = self._spectrum(delta, noise)
        residual = residual.to(torch.float64).reshape(-1, 1)
        if self.spec.mean == "complement":
            alpha = self._low_rank_solve(vectors, eig, sigma2, residual)
        else:
            alpha = vectors @ ((vectors.T @ residual) / (eig + sigma2)[:, None])  # shape: (M, 1)
        columns = torch.cat([vectors, alpha], 1)  # shape: (M, k + 1): one pass of vjps for both
        scale = torch.cat([(eig + sigma2).rsqrt(), eig.new_ones(1)])
        pulled = self.directions(delta, columns, scale)  # shape: (P, k + 1)
        weights = self.network.flat_params.to(torch.float64) if self.spec.mean == "network" else pulled[:, -1]
        return LowRankPosterior(self.network, self.groups, self.budget, delta, weights, pulled[:, :-1])


class LanczosLaplaceSolver(_LanczosBase, LaplaceSolver):
    r"""Laplace GP: :math:`\log|I + B^\top K B| \approx \sum_{i\le k}\log(1 + s_i(\delta))`, and the
    conservative low-rank posterior centred at the MAP. See the module docstring."""

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, spec: Lanczos,
        hessian_factor: Tensor,
    ) -> None:
        super().__init__(network, groups, x, budget, spec, hessian_factor)

    def log_det(self, delta: Tensor) -> Tensor:
        return self.decomposition(delta).eigenvalues(delta).log1p().sum()

    @torch.no_grad()
    def laplace_posterior(self, delta: Tensor) -> LowRankPosterior:
        r""":math:`W = P_0^{-1} J^\top B U (I + S)^{-1/2}`, weights :math:`\hat\theta`."""
        delta = delta.detach()
        dec = self.decomposition(delta)
        scale = dec.eigenvalues(delta).log1p().mul(-0.5).exp()  # (1 + s)^{-1/2}
        directions = self.directions(delta, dec.vectors, scale)
        weights = self.network.flat_params.to(torch.float64)
        return LowRankPosterior(self.network, self.groups, self.budget, delta, weights, directions)

