r"""The CG / BBMM route: preconditioned conjugate gradients on the lazy NTK, stochastic Lanczos
quadrature for the log-determinant, and a LOVE-style cache for predictive variances.

Nothing of size ``M x M`` (``M = N C``) or ``N x P`` is formed. Every product with
:math:`A = K(\delta) + S` is one batched vjp and one batched jvp over the training data
(:func:`~ntkgp.ntk.kernel_matmul`), for all right-hand sides at once.

**Preconditioner.** :math:`P = LL^\top + S`, with :math:`L` ``(M, k)`` from a partial pivoted
Cholesky of :math:`K` (the NTK diagonal from :func:`~ntkgp.ntk.gram_diagonal`, cached once;
the columns at the pivots by batched products, recomputed when :math:`\delta` changes), applied by
Woodbury, with exact :math:`\log|P|` (:mod:`ntkgp.linalg.preconditioner`).

**Evidence.** One batched CG run on :math:`[r, R w_1, \dots, R w_s]` (:math:`RR^\top = P`,
:math:`w_i` Rademacher) gives

* :math:`r^\top A^{-1} r = r^\top \alpha` to the CG tolerance: with the reached residual
  :math:`\rho = r - A\alpha`, the error is :math:`-\rho^\top A^{-1}\rho` (CG's residual is
  orthogonal to its iterate), so the relative error is at most :math:`\epsilon^2\kappa(A)` for
  relative residual :math:`\epsilon`;
* :math:`\log|A| = \log|P| + \operatorname{tr}\log(R^{-1}AR^{-\top})`, the trace by stochastic
  Lanczos quadrature from the CG coefficients (:mod:`ntkgp.linalg.slq`): unbiased up to the
  quadrature error, with sample standard error reported in ``solver.last_info.logdet_std_error``.

Probes come from a generator seeded with ``seed`` on every call, so the estimate is a smooth,
deterministic function of the hyperparameters (common random numbers across optimizer steps).

**Gradients** (a :class:`torch.autograd.Function`, w.r.t. :math:`\delta` and the noise):
:math:`d(r^\top A^{-1} r) = -\alpha^\top dA\,\alpha` (exact to the tolerance) and
:math:`d\log|A| = \operatorname{tr}(A^{-1}dA) \approx \frac1s \sum_i (A^{-1}Rw_i)^\top dA\,(R^{-\top}w_i)`
(unbiased, since :math:`\mathbb E[R w w^\top R^{-1}] = I`); :math:`dA/d\delta_g` through
:meth:`~ntkgp.solvers.base.GaussianSolver.bilinear_derivative`, :math:`dA/ds = \operatorname{diag}`.

**Posterior.** Mean weights :math:`\bar\theta = P_0^{-1}J^\top\alpha` (one vjp); covariance
:math:`K_{**} - (J_*W)(J_*W)^\top` (:class:`~ntkgp.solvers.low_rank_posterior.LowRankPosterior`)
with :math:`W = P_0^{-1}J^\top Q L_T^{-\top}` from ``variance_rank`` steps of Lanczos on
:math:`A` started at the residual (full reorthogonalization; :math:`A \approx QTQ^\top`,
:math:`T = L_TL_T^\top`). The variances are never below the exact ones
(:math:`QT^{-1}Q^\top \preceq A^{-1}`) and are exact (to rounding) when
``variance_rank >= N C``: the default (512) makes them exact for ``N C <= 512``. Below that the
error is that of a rank-``k`` Krylov approximation of :math:`A^{-1}` on the kernel's columns,
small where the NTK spectrum has decayed below the noise within ``k`` eigenvalues and large
otherwise (measured in ``tests/test_conjugate_gradients.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ntkgp.linalg.cg import CGResult, conjugate_gradients
from ntkgp.linalg.cholesky import cholesky
from ntkgp.linalg.preconditioner import LowRankPlusDiagonal
from ntkgp.linalg.slq import slq_log_det
from ntkgp.memory import check_fits
from ntkgp.ntk import NTKProblem, gram, gram_diagonal, kernel_matmul_columns, pullback
from ntkgp.posteriors.low_rank import LowRankPosterior
from ntkgp.solvers.base import GaussianSolver, LaplaceSolver, SolverSpec
from ntkgp.solvers.cg_rows import CGRows

__all__ = ["CGInfo", "CGSolver", "ConjugateGradients"]


@dataclass(frozen=True)
class ConjugateGradients(SolverSpec):
    r"""Preconditioned CG with stochastic Lanczos quadrature and LOVE variances (Gaussian likelihoods).

    Use as ``LinearizedGP(net, likelihood, x, y, solver=ConjugateGradients())``.

    Parameters
    ----------
    tolerance:
        Relative residual :math:`\lVert r - A\alpha\rVert/\lVert r\rVert` at which CG stops, per
        right-hand side. The inverse quadratic form then has relative error at most
        :math:`\epsilon^2\kappa(A)`; the default ``1e-8`` keeps it below ``1e-6`` up to
        :math:`\kappa = 10^{10}` and the posterior mean accurate in low-noise (badly conditioned)
        problems.
    max_iterations:
        CG iterations at most; a ``UserWarning`` is raised when the tolerance is not reached.
    num_probes:
        Rademacher probes for the log-determinant and its gradient (standard error reported).
    probes:
        ``"rademacher"``, or ``"basis"`` (the ``M`` unit vectors: a deterministic, exact trace,
        costing ``M`` right-hand sides; for checks on small problems).
    preconditioner_rank:
        Largest rank of the pivoted-Cholesky preconditioner (``0``: the diagonal preconditioner
        :math:`S`).
    preconditioner_tolerance:
        Pivoting stops early once the residual trace :math:`\operatorname{tr}(K - LL^\top)` is at
        most this multiple of the smallest noise variance :math:`s_{\min}`. Since
        :math:`P^{-1}A = I + P^{-1}(K - LL^\top)`, the preconditioned condition number is then at
        most ``1 + preconditioner_tolerance`` and CG needs at most about
        :math:`\tfrac12\sqrt{\kappa}\,\log(2/\epsilon)` iterations (about 100 at the
        defaults). Low noise therefore raises the rank (up to ``preconditioner_rank``), not the
        iteration count; each pivot costs one jvp column, 1/33 of a CG iteration with 32 probes.
    variance_rank:
        Lanczos steps for the predictive-variance cache (at most ``M``; ``M`` is exact).
    seed:
        Seed of the probe generator (re-seeded on every evaluation).
    """

    tolerance: float = 1e-8
    max_iterations: int = 1000
    num_probes: int = 32
    probes: str = "rademacher"
    preconditioner_rank: int = 512
    preconditioner_tolerance: float = 100.0
    variance_rank: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance}")
        if self.max_iterations < 1 or self.num_probes < 1 or self.variance_rank < 1:
            raise ValueError("max_iterations, num_probes and variance_rank must be at least 1")
        if self.preconditioner_rank < 0 or not self.preconditioner_tolerance >= 0:
            raise ValueError("preconditioner_rank and preconditioner_tolerance must be >= 0")
        if self.probes not in ("rademacher", "basis"):
            raise ValueError(f"probes must be 'rademacher' or 'basis', got {self.probes!r}")

    def gaussian(self, problem: NTKProblem) -> CGSolver:
        return CGSolver(problem, self)

    def laplace(self, problem: NTKProblem, hessian_root: Tensor) -> LaplaceSolver:
        raise NotImplementedError(
            "ConjugateGradients supports Gaussian likelihoods only; for the Laplace GP of a "
            "non-Gaussian likelihood at large N use the inducing-point or Lanczos routes "
            "(ntkgp.solvers.inducing, ntkgp.solvers.lanczos), or an exact solver"
        )


@dataclass
class CGInfo:
    """What the last CG run of a :class:`CGSolver` reached."""

    #: ``"evidence"``, ``"solve"`` or ``"posterior"``
    purpose: str
    tolerance: float
    #: iterations of the slowest column
    iterations: int
    #: largest true relative residual over the right-hand sides
    max_residual: float
    #: true relative residuals per right-hand side, ``(t,)``
    residuals: Tensor
    converged: bool
    #: rank of the pivoted-Cholesky factor used
    preconditioner_rank: int
    #: standard error of the SLQ log-determinant (``None`` without one; ``0`` for ``probes="basis"``)
    logdet_std_error: float | None = None
    #: Lanczos steps of the variance cache (posterior only)
    variance_rank: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class CGSolver(CGRows, GaussianSolver):
    r"""Iterative linear algebra with :math:`A = K(\delta) + S` (see the module docstring).

    Attributes
    ----------
    last_info:
        :class:`CGInfo` of the last CG run (iterations, reached residuals, SLQ standard error).
    """

    name = "cg"
    exact = False

    def __init__(self, problem: NTKProblem, spec: ConjugateGradients) -> None:
        super().__init__(problem)
        self.spec = spec
        #: per-group NTK diagonals, ``(G, M)``, float64
        self.group_diagonals = gram_diagonal(self.ntk, problem.x)
        self.last_info: CGInfo | None = None
        self._factor_cache: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------ operators
    def _kernel_matmul(self, delta: Tensor, rhs: Tensor) -> Tensor:
        # shape: (M, t) -> (M, t), no gradients; with a process group this rank's rows of both
        with torch.no_grad():
            x, w = self.problem.x, delta.detach().reciprocal()
            return kernel_matmul_columns(self.ntk, x, x, w, rhs.to(self.network.dtype), reduce=self.reduce)

    def _operator(self, delta: Tensor, noise: Tensor) -> Callable[[Tensor], Tensor]:
        """:math:`V \\mapsto (K + S) V` for ``V`` ``(M, t)``, no gradients."""
        s = noise.detach().to(torch.float64).unsqueeze(-1)
        return lambda v: self._kernel_matmul(delta, v) + s * v

    def _pivot_columns(self, delta: Tensor, index: Tensor) -> Tensor:
        """:math:`K[:, \\text{index}]` ``(M, b)``: one vjp at the pivot points, one jvp on all data."""
        C = self.problem.num_outputs
        if self.sharding.distributed:
            return self.sharded_pivot_columns(delta, index)
        points, inverse = torch.unique(torch.div(index, C, rounding_mode="floor"), return_inverse=True)
        select = torch.zeros(points.numel() * C, index.numel(), dtype=self.network.dtype, device=index.device)
        select[inverse * C + index % C, torch.arange(index.numel(), device=index.device)] = 1
        x = self.problem.x
        with torch.no_grad():
            return kernel_matmul_columns(self.ntk, x, x[points], delta.detach().reciprocal(), select)

    def _low_rank_factor(self, delta: Tensor, noise: Tensor) -> Tensor:
        """Pivoted-Cholesky :math:`L` ``(M, k)`` of :math:`K(\\delta)`, cached per ``delta`` and
        smallest noise."""
        smallest = -self.sharding.max(-noise.detach().min().reshape(1))  # over every rank's rows
        key = torch.cat([delta.detach().to(torch.float64).reshape(-1), smallest.to(torch.float64)])
        if self._factor_cache is not None and torch.equal(self._factor_cache[0], key):
            return self._factor_cache[1]
        rank = min(self.spec.preconditioner_rank, self.problem.total_size)
        if rank == 0:
            factor = torch.zeros(self.size, 0, dtype=torch.float64, device=self.network.device)
        else:
            check_fits(8 * 3 * self.size * rank, f"the rank-{rank} preconditioner", self.network.device)
            diagonal = delta.detach().to(torch.float64).reciprocal() @ self.group_diagonals
            trace_tol = self.spec.preconditioner_tolerance * float(key[-1])
            factor = self.pivoted_factor(diagonal, lambda idx: self._pivot_columns(delta, idx), rank, trace_tol)
        self._factor_cache = (key, factor)
        return factor

    def preconditioner(self, delta: Tensor, noise: Tensor) -> LowRankPlusDiagonal:
        """:math:`P = LL^\\top + S` at these hyperparameters."""
        return self.low_rank_plus_diagonal(self._low_rank_factor(delta, noise), noise.detach())

    def run_cg(
        self, delta: Tensor, noise: Tensor, rhs: Tensor, purpose: str, precond: LowRankPlusDiagonal | None = None
    ) -> CGResult:
        """Preconditioned CG on :math:`A X = \\text{rhs}` ``(M, t)``; records :attr:`last_info`, warns
        when the tolerance is not reached."""
        precond = precond or self.preconditioner(delta, noise)
        spec = self.spec
        result = conjugate_gradients(
            self._operator(delta, noise),
            rhs.detach().to(torch.float64),
            precondition=precond.solve,
            tolerance=spec.tolerance,
            max_iterations=spec.max_iterations,
            progress=self.network.progress,
            reduce=self.reduce,
        )
        self.last_info = CGInfo(
            purpose=purpose,
            tolerance=spec.tolerance,
            iterations=int(result.iterations.max()),
            max_residual=result.max_residual,
            residuals=result.residuals,
            converged=result.converged,
            preconditioner_rank=precond.v.shape[-1],
        )
        if not result.converged:
            warnings.warn(
                f"CG ({purpose}) did not reach the relative residual {spec.tolerance:.1e} in "
                f"{spec.max_iterations} iterations (reached {result.max_residual:.2e}); raise "
                "max_iterations or preconditioner_rank, or loosen tolerance",
                stacklevel=3,
            )
        return result

    def probe_vectors(self) -> tuple[Tensor, float]:
        """Probes :math:`w` ``(M, s)`` and the weight of each in the trace (``1/s``, or 1 for a basis); with a
        process group, this rank's rows of the probes one process would draw."""
        spec = self.spec
        return self.probes(
            spec.probes, spec.num_probes, spec.seed
        ), 1.0 if spec.probes == "basis" else 1.0 / spec.num_probes

    # ------------------------------------------------------- GaussianSolver
    def inv_quad_logdet(self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool) -> tuple[Tensor, Tensor]:
        noise = noise.to(torch.float64).expand(self.size)
        return _InvQuadLogDet.apply(delta, noise, rhs, self, logdet)

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        noise = noise.to(torch.float64).expand(self.size)
        return _Solve.apply(delta, noise, rhs.to(torch.float64), self)

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        if self.sharding.distributed:
            raise NotImplementedError("a sharded CG solver does not form the N C x N C training covariance")
        M, G = self.size, self.layout.num_groups
        check_fits(8 * (G + 2) * M * M, f"the dense training kernel ({M} x {M})", self.network.device)
        kernel = self.layout.weighted(delta.to(torch.float64).reciprocal(), gram(self.ntk, self.problem.x))
        return kernel + torch.diag_embed(noise.to(torch.float64).expand(M))

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        return self._operator(delta, noise.expand(self.size))(rhs.to(torch.float64))

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        return delta.to(torch.float64).reciprocal() @ self.group_diagonals + noise.to(torch.float64)

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> LowRankPosterior:
        delta, noise = delta.detach(), noise.detach().to(torch.float64).expand(self.size)
        residual = residual.to(torch.float64).reshape(-1)
        alpha = self.run_cg(delta, noise, residual.unsqueeze(-1), "posterior").solution  # shape: (M, 1)
        info = self.last_info
        weights = self._pull_back(delta, alpha)[0]  # theta_bar = P0^{-1} J^T alpha, shape: (P,)
        generator = torch.Generator().manual_seed(self.spec.seed)
        q, t = self.lanczos(self._operator(delta, noise), residual, self.spec.variance_rank, generator)
        factor = cholesky(t, what="the Lanczos tridiagonal of K + S")  # T = L_T L_T^T
        pulled = self._pull_back(delta, q)  # (P0^{-1} J^T Q)^T, shape: (k, P)
        directions = torch.linalg.solve_triangular(factor, pulled, upper=False).T  # W, shape: (P, k)
        if info is not None:
            info.variance_rank = q.shape[-1]
            self.last_info = info
        return LowRankPosterior(self.ntk, delta, weights, directions)

    def _pull_back(self, delta: Tensor, columns: Tensor) -> Tensor:
        r""":math:`(P_0^{-1} J^\top V)^\top` for ``V`` ``(M, t)``: ``(t, P)``, float64."""
        x = self.problem.x
        cot = columns.T.reshape(columns.shape[-1], x.num, self.problem.num_outputs)
        return self.sharding.sum_(pullback(self.ntk, x, cot, scale=delta.to(torch.float64).reciprocal()))


class _InvQuadLogDet(torch.autograd.Function):
    """Per-column :math:`r^\\top A^{-1} r` and :math:`\\log|A|` by CG + SLQ, with estimated gradients."""

    @staticmethod
    def forward(
        ctx: Any, delta: Tensor, noise: Tensor, rhs: Tensor | None, solver: CGSolver, logdet: bool
    ) -> tuple[Tensor, Tensor]:
        precond = solver.preconditioner(delta, noise)
        t = 0 if rhs is None else rhs.shape[-1]
        parts = [] if rhs is None else [rhs.detach().to(torch.float64)]
        probes, weight = None, 0.0
        if logdet:
            probes, weight = solver.probe_vectors()  # shape: (M, s)
            parts.append(precond.root(probes))
        zero = torch.zeros((), dtype=torch.float64, device=noise.device)
        inv_quad, log_det = zero, zero
        solution = noise.new_zeros(solver.size, 0)
        if parts:
            cg = solver.run_cg(delta, noise, torch.cat(parts, -1), "evidence", precond)
            solution = cg.solution
            if rhs is not None:
                inv_quad = solver.sharding.sum_((parts[0] * solution[:, :t]).sum(0))  # shape: (t,)
            if logdet:
                assert probes is not None
                basis = solver.spec.probes == "basis"
                norms_sq = solver.sharding.sum_(probes.square().sum(0)) * (solver.problem.total_size if basis else 1.0)
                trace, error = slq_log_det(cg, slice(t, None), norms_sq)
                log_det = precond.logdet() + trace
                assert solver.last_info is not None
                solver.last_info.logdet_std_error = 0.0 if basis else float(error)
        ctx.solver, ctx.t, ctx.weight = solver, t, weight
        right_probes = precond.root_inv_t(probes) if probes is not None else solution[:, t:]
        ctx.save_for_backward(delta, noise, solution, right_probes)
        return inv_quad, log_det

    @staticmethod
    def backward(ctx: Any, grad_quad: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:
        delta, noise, solution, right_probes = ctx.saved_tensors
        t = ctx.t
        alpha, probe_solves = solution[:, :t], solution[:, t:]
        left, right = [], []
        if t:
            left.append(-alpha * grad_quad.to(torch.float64).reshape(1, -1).expand(1, t))
            right.append(alpha)
        if probe_solves.shape[-1]:
            left.append(probe_solves * (ctx.weight * grad_logdet.to(torch.float64)))
            right.append(right_probes)
        grad_delta = grad_noise = grad_rhs = None
        if left and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            grad_delta, grad_noise = ctx.solver.bilinear_derivative(
                delta, noise, torch.cat(left, -1), torch.cat(right, -1)
            )
        if t and ctx.needs_input_grad[2]:
            grad_rhs = 2.0 * alpha * grad_quad.to(torch.float64).reshape(1, -1)
        return grad_delta, grad_noise, grad_rhs, None, None


class _Solve(torch.autograd.Function):
    r""":math:`A^{-1} B` by CG; backward :math:`\bar B = A^{-1}\bar X`, :math:`dA` term
    :math:`-\sum_t (A^{-1}\bar x_t)^\top dA\, x_t` (a second CG run)."""

    @staticmethod
    def forward(ctx: Any, delta: Tensor, noise: Tensor, rhs: Tensor, solver: CGSolver) -> Tensor:
        solution = solver.run_cg(delta, noise, rhs, "solve").solution
        ctx.solver = solver
        ctx.save_for_backward(delta, noise, solution)
        return solution

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        delta, noise, solution = ctx.saved_tensors
        adjoint = ctx.solver.run_cg(delta, noise, grad_out, "solve (backward)").solution
        grad_delta = grad_noise = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_delta, grad_noise = ctx.solver.bilinear_derivative(delta, noise, -adjoint, solution)
        return grad_delta, grad_noise, adjoint if ctx.needs_input_grad[2] else None, None
