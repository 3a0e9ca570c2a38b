r"""Low-rank solvers from a block Lanczos decomposition of the NTK Gram (no dense kernel, no CG).

The operator decomposed is :math:`A = B^\top K(\delta) B`, ``(M, M)`` with ``M = N C``: :math:`B = I`
for a Gaussian likelihood with one noise variance :math:`\sigma^2` (handled analytically), the
per-point GGN root for a Laplace likelihood. Block Lanczos on the lazy product
(:func:`~ntkgp.ntk.kernel_matmul`: one batched vjp and one batched jvp per block) gives the top ``k``
Ritz pairs :math:`A \approx U S U^\top`; with :math:`c_{ig} = \lVert J_g^\top B u_i\rVert^2` the
eigenvalues are :math:`s_i(\delta) = \sum_g c_{ig}/\delta_g`, exact in :math:`\delta` for one group.

* **Evidence**: the exact algebra of :math:`U\Lambda U^\top + \sigma^2 I` (Gaussian) or
  :math:`\sum_{i\le k}\log(1 + s_i)` (Laplace). The log-determinants are lower bounds of the exact
  ones; with ``k = N C`` everything is exact.
* **Posterior**: :math:`\Sigma_{**} = K_{**} - (J_*W)(J_*W)^\top`,
  :math:`W = P_0^{-1}J^\top B U (I + S)^{-1/2}`, conservative (never below the exact covariance).

The error of every quantity is governed by the discarded spectrum relative to the noise; see
``docs/solvers.md`` ("Lanczos") for the derivations, the signs of the errors and the choice of
``mean``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ntkgp.linalg.block_lanczos import block_lanczos
from ntkgp.linalg.hessian_root import apply_root, apply_root_transpose
from ntkgp.memory import check_fits
from ntkgp.ntk import NTKProblem, kernel_matmul_columns, pullback
from ntkgp.posteriors.low_rank import LowRankPosterior
from ntkgp.solvers.base import GaussianSolver, LaplaceSolver, SolverBase, SolverSpec, output_noise

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

    def gaussian(self, problem: NTKProblem) -> LanczosSolver:
        _refuse_sharded(problem)
        return LanczosSolver(problem, self)

    def laplace(self, problem: NTKProblem, hessian_root: Tensor) -> LanczosLaplaceSolver:
        _refuse_sharded(problem)
        return LanczosLaplaceSolver(problem, self, hessian_root)


def _refuse_sharded(problem: NTKProblem) -> None:
    if problem.sharding.distributed:
        raise NotImplementedError(
            "the Lanczos route does not shard over a process group (its block steps factor whole N C-row blocks); "
            "use ntkgp.solvers.ConjugateGradients or Inducing with process_group"
        )


def _group_norms(solver: _LanczosBase, vectors: Tensor) -> Tensor:
    r""":math:`c_{ig} = \lVert J_g^\top B u_i\rVert^2`, ``(k, G)``, float64, ``block`` vectors per vjp."""
    out = torch.zeros(vectors.shape[1], solver.layout.num_groups, dtype=torch.float64, device=vectors.device)
    for start in range(0, vectors.shape[1], solver.block_size):
        pulled = solver.pull(vectors[:, start : start + solver.block_size])  # shape: (b, P)
        out[start : start + solver.block_size] += solver.layout.group_sums(pulled.square())
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
        self,
        problem: NTKProblem,
        spec: Lanczos,
        hessian_root: Tensor | None,
    ) -> None:
        SolverBase.__init__(self, problem)
        self.spec = spec
        self.rank, self.block_size, self.num_steps = spec.settings(self.size)
        #: Laplace: per-point :math:`B` ``(N, C, C)``, float64; Gaussian: ``None`` (:math:`B = I`)
        self.hessian_root = None if hessian_root is None else hessian_root.to(torch.float64)
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
        generator = torch.Generator().manual_seed(self.spec.seed)
        ritz, vectors = block_lanczos(
            lambda v: self.operator_matmul(delta, v),
            self.size,
            self.rank,
            block_size=self.block_size,
            num_steps=self.num_steps,
            generator=generator,
            device=self.network.device,
            progress=self.network.progress,
        )
        norms = _group_norms(self, vectors)
        return LanczosDecomposition(direction.clone(), vectors, norms, ritz, delta.clone())

    def directions(self, delta: Tensor, columns: Tensor, scale: Tensor) -> Tensor:
        r""":math:`P_0^{-1} J^\top B V \operatorname{diag}(\text{scale})`, ``(P, t)``, float64."""
        out = torch.zeros(self.network.num_parameters, columns.shape[1], dtype=torch.float64, device=columns.device)
        inv_delta = delta.to(torch.float64).reciprocal()
        for start in range(0, columns.shape[1], self.block_size):
            sl = slice(start, start + self.block_size)
            pulled = self.pull(columns[:, sl], scale=inv_delta)  # shape: (b, P)
            out[:, sl] = (pulled * scale[sl, None]).T
        return out

    def pull(self, columns: Tensor, *, scale: Tensor | None = None) -> Tensor:
        r""":math:`(S J^\top B V)^\top` for ``V`` ``(M, t)``: ``(t, P)``, float64 (``B = I`` for Gaussian)."""
        x = self.problem.x
        cot = columns if self.hessian_root is None else apply_root(self.hessian_root, columns)
        return pullback(self.ntk, x, cot.T.reshape(columns.shape[1], x.num, self.problem.num_outputs), scale=scale)

    def operator_matmul(self, delta: Tensor, columns: Tensor) -> Tensor:
        r""":math:`B^\top J P_0^{-1} J^\top B V` for ``V`` ``(M, t)``, float64."""
        x, root = self.problem.x, self.hessian_root
        cot = columns if root is None else apply_root(root, columns)
        out = kernel_matmul_columns(self.ntk, x, x, delta.to(torch.float64).reciprocal(), cot)
        return out if root is None else apply_root_transpose(root, out)


class LanczosSolver(_LanczosBase, GaussianSolver):
    r"""Gaussian likelihood: :math:`K + \sigma^2 I \approx U \Lambda(\delta) U^\top + \sigma^2 I`.

    Every method refers to that approximation (the contract of an inexact
    :class:`~ntkgp.solvers.base.GaussianSolver`): solves, log-determinant, products, the diagonal
    and the dense matrix are those of :math:`U\Lambda U^\top + \sigma^2 I`. See the module docstring.
    """

    def __init__(self, problem: NTKProblem, spec: Lanczos) -> None:
        super().__init__(problem, spec, None)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _scalar_noise(noise: Tensor) -> Tensor:
        """The one noise variance :math:`\\sigma^2` (0-d, differentiable) of ``noise`` ``(M,)``: the
        decomposition of :math:`K` holds for one variance shared by every training output."""
        return output_noise(noise, 1, "Lanczos", per_output=False)[0]

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
    def inv_quad_logdet(self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool) -> tuple[Tensor, Tensor]:
        vectors, eig, sigma2 = self._spectrum(delta, noise)
        zero = torch.zeros((), dtype=torch.float64, device=vectors.device)
        inv_quad, log_det = zero, zero
        if rhs is not None:
            rhs = rhs.to(torch.float64)
            proj = vectors.T @ rhs  # shape: (k, t)
            rest = (rhs - vectors @ proj).square().sum(0)  # shape: (t,), outside span(U)
            inv_quad = (proj.square() / (eig + sigma2)[:, None]).sum(0) + rest / sigma2
            if self.layout.num_groups > 1 and torch.is_grad_enabled() and delta.requires_grad:
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
        pulled = self.pull(vectors @ coefficients)  # shape: (t, P)
        full = self.layout.group_sums(pulled.square())  # shape: (t, G), a^T C_g a
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

    def bilinear_derivative(self, delta: Tensor, noise: Tensor, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        r"""Gradients of :math:`\sum_t l_t^\top (U T(\delta) U^\top + S) r_t` (see
        :meth:`_rotation_gradient`): :math:`-\sum_t (J_g^\top UU^\top l_t)\cdot(J_g^\top UU^\top r_t)/\delta_g^2`
        (two vjps) and :math:`l \odot r`."""
        vectors = self.decomposition(delta).vectors
        left, right = left.to(torch.float64), right.to(torch.float64)
        pulled_left = self.pull(vectors @ (vectors.T @ left))  # shape: (t, P)
        pulled_right = self.pull(vectors @ (vectors.T @ right))
        per_group = self.layout.group_sums((pulled_left * pulled_right).sum(0))
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
        return LowRankPosterior(self.ntk, delta, weights, pulled[:, :-1])


class LanczosLaplaceSolver(_LanczosBase, LaplaceSolver):  # type: ignore[misc]  # its root is never None
    r"""Laplace GP: :math:`\log|I + B^\top K B| \approx \sum_{i\le k}\log(1 + s_i(\delta))`, and the
    conservative low-rank posterior centred at the MAP. See the module docstring."""

    def __init__(
        self,
        problem: NTKProblem,
        spec: Lanczos,
        hessian_root: Tensor,
    ) -> None:
        super().__init__(problem, spec, hessian_root)

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
        return LowRankPosterior(self.ntk, delta, weights, directions)
