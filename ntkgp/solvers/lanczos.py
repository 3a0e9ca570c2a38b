r"""Low-rank solvers from a block Lanczos decomposition of the NTK Gram (no dense kernel, no CG).

The operator decomposed is :math:`A = B^\top K(\delta) B`, ``(M, M)`` with ``M = N C``: :math:`B = I`
for a Gaussian likelihood (any diagonal noise, which enters only through ``k x k`` matrices; see
:class:`LanczosSolver`), the per-point GGN root for a Laplace likelihood. Block Lanczos on the lazy product
(:func:`~ntkgp.ntk.kernel_matmul`: one batched vjp and one batched jvp per block) gives the top ``k``
Ritz pairs :math:`A \approx U S U^\top`; with :math:`c_{ig} = \lVert J_g^\top B u_i\rVert^2` the
eigenvalues are :math:`s_i(\delta) = \sum_g c_{ig}/\delta_g`, exact in :math:`\delta` for one group.

* **Evidence**: the exact algebra of :math:`U\Lambda U^\top + \sigma^2 I` (Gaussian; with noise
  that varies, the marginal likelihood of :math:`U^\top y` times that of the rest given it) or
  :math:`\sum_{i\le k}\log(1 + s_i)` (Laplace). The log-determinants are lower bounds of the exact
  ones; with ``k = N C`` everything is exact.
* **Posterior**: :math:`\Sigma_{**} = K_{**} - (J_*W)(J_*W)^\top`,
  :math:`W = P_0^{-1}J^\top B U (I + S)^{-1/2}`, conservative (never below the exact covariance).

The error of every quantity is governed by the discarded spectrum relative to the noise; see
``docs/solvers.md`` ("Lanczos") for the derivations, the signs of the errors and the choice of
``mean``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ntkgp.linalg.block_lanczos import block_lanczos
from ntkgp.linalg.hessian_root import apply_root, apply_root_transpose
from ntkgp.memory import check_fits
from ntkgp.ntk import NTKProblem, kernel_matmul_columns, pullback
from ntkgp.posteriors.low_rank import LowRankPosterior
from ntkgp.solvers.base import GaussianSolver, LaplaceSolver, SolverBase, SolverSpec

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
    _output_grams: Tensor | None = field(default=None, repr=False)

    def eigenvalues(self, delta: Tensor) -> Tensor:
        r""":math:`s_i(\delta) = \sum_g c_{ig}/\delta_g` ``(k,)``, differentiable in ``delta``."""
        return self.group_norms @ delta.to(torch.float64).reciprocal()

    def output_grams(self, num_outputs: int) -> Tensor:
        r""":math:`U_c^\top U_c` ``(C, k, k)`` over the rows :math:`U_c` of each output (interleaved rows), cached."""
        if self._output_grams is None:
            rows = self.vectors.reshape(-1, num_outputs, self.vectors.shape[1])
            self._output_grams = torch.einsum("nci,ncj->cij", rows, rows)
        return self._output_grams


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


def _factor_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    r""":math:`(LL^\top)^{-1}R` for a Cholesky factor :math:`L` ``(k, k)``, or a diagonal one given as ``(k,)``."""
    return rhs / factor.square()[:, None] if factor.dim() == 1 else torch.cholesky_solve(rhs, factor)


def _factor_diagonal(factor: Tensor) -> Tensor:
    """The diagonal of a Cholesky factor ``(k, k)``, or of a diagonal one given as ``(k,)``."""
    return factor if factor.dim() == 1 else factor.diagonal()


@dataclass
class _ProjectedSystem:
    r"""The Gaussian approximation at one ``(delta, noise)``: :math:`\tilde K + S`, with
    :math:`\tilde K = \tilde U T \tilde U^\top`, :math:`\tilde U = S U V^{-1}`, :math:`V = U^\top S U` and
    :math:`T = U^\top K U = \Lambda(\delta)` (see :class:`LanczosSolver`). Differentiable.

    Attributes
    ----------
    vectors:
        :math:`U` ``(M, k)``.
    eigenvalues:
        :math:`\Lambda(\delta)` ``(k,)``.
    noise:
        The diagonal of :math:`S` ``(M,)``, float64.
    noise_factor:
        The Cholesky factor of :math:`V = U^\top S U` ``(k, k)``, or its diagonal ``(k,)`` when :math:`V`
        is diagonal (one output, one noise variance).
    factor:
        The Cholesky factor of :math:`V + \Lambda`, ``(k, k)`` or its diagonal ``(k,)`` likewise.
    uniform:
        Whether :math:`S = \sigma^2 I` (then :math:`V = \sigma^2 I` and :math:`\tilde U = U`).
    """

    vectors: Tensor
    eigenvalues: Tensor
    noise: Tensor
    noise_factor: Tensor
    factor: Tensor
    uniform: bool

    def log_det(self) -> Tensor:
        r""":math:`\log|\tilde K + S| = \log|S| - \log|V| + \log|V + \Lambda|`."""
        return (
            self.noise.log().sum()
            - 2 * _factor_diagonal(self.noise_factor).log().sum()
            + 2 * _factor_diagonal(self.factor).log().sum()
        )

    def parts(self, rhs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""For ``R`` ``(M, t)``: :math:`p = U^\top R` ``(k, t)``, :math:`a = (V + \Lambda)^{-1} p` ``(k, t)``
        and the residual outside the projection, :math:`E = R - S U V^{-1} p` ``(M, t)``."""
        proj = self.vectors.T @ rhs
        coefficients = _factor_solve(self.factor, proj)
        rest = rhs - self.noise[:, None] * (self.vectors @ _factor_solve(self.noise_factor, proj))
        return proj, coefficients, rest

    def inv_quad(self, rhs: Tensor) -> tuple[Tensor, Tensor]:
        r"""Per-column :math:`r^\top(\tilde K + S)^{-1}r = e^\top S^{-1} e + p^\top a` ``(t,)``, and :math:`a`."""
        proj, coefficients, rest = self.parts(rhs)
        return (rest.square() / self.noise[:, None]).sum(0) + (proj * coefficients).sum(0), coefficients

    def solve(self, rhs: Tensor) -> Tensor:
        r""":math:`(\tilde K + S)^{-1}R = S^{-1}E + U a`."""
        _, coefficients, rest = self.parts(rhs)
        return rest / self.noise[:, None] + self.vectors @ coefficients

    def kernel_vectors(self) -> Tensor:
        r""":math:`\tilde U = S U V^{-1}` ``(M, k)`` (:math:`U` itself when :math:`S = \sigma^2 I`)."""
        if self.uniform and not self.noise.requires_grad:
            return self.vectors  # S U V^{-1} = U (U^T U)^{-1} = U
        return self.noise[:, None] * _factor_solve(self.noise_factor, self.vectors.T).T


class LanczosSolver(_LanczosBase, GaussianSolver):
    r"""Gaussian likelihood with any diagonal noise :math:`S`: the exact GP given the data projected on
    the Lanczos vectors.

    With :math:`U` ``(M, k)`` the Ritz vectors of :math:`K`, :math:`T = U^\top K U = \Lambda(\delta)`
    (diagonal) and :math:`V = U^\top S U`, the route is the exact marginal and posterior of
    :math:`U^\top y`, the rest of :math:`y` explained by the noise alone given :math:`U^\top y`. That is
    the GP with kernel :math:`\tilde K = \tilde U T \tilde U^\top`, :math:`\tilde U = S U V^{-1}`:

    * :math:`\log|\tilde K + S| = \log|S| - \log|V| + \log|V + \Lambda| \le \log|K + S|` for any
      orthonormal :math:`U` (the Schur complement of :math:`K + S` is at least that of :math:`S`);
    * :math:`r^\top(\tilde K + S)^{-1}r = e^\top S^{-1}e + p^\top(V + \Lambda)^{-1}p`, :math:`p = U^\top r`,
      :math:`e = r - S U V^{-1} p`;
    * the posterior, conditioned on :math:`U^\top y` only, is conservative.

    For :math:`S = \sigma^2 I` this is :math:`U\Lambda U^\top + \sigma^2 I`. The noise may vary over
    outputs (a ``MultitaskGaussianLikelihood`` with per-task noise: :math:`V = \sum_c \sigma_c^2 U_c^\top U_c`
    from ``C`` cached ``k x k`` Grams, :math:`O(Ck^2)` per evaluation) or over points (``FixedNoise``:
    :math:`O(Mk^2)` per evaluation); the decomposition of :math:`K` never depends on it. Every method
    refers to :math:`\tilde K + S` (the contract of an inexact :class:`~ntkgp.solvers.base.GaussianSolver`).
    """

    def __init__(self, problem: NTKProblem, spec: Lanczos) -> None:
        super().__init__(problem, spec, None)

    # ------------------------------------------------------------------ pieces
    def _projected_noise(self, dec: LanczosDecomposition, noise: Tensor) -> tuple[Tensor, bool]:
        r""":math:`V = U^\top S U`, differentiable in ``noise`` ``(M,)``, and whether :math:`S = \sigma^2 I`.

        ``(k, k)``, or its diagonal ``(k,)`` for one output and one noise variance (:math:`V = \sigma^2 I`).
        Noise that is the same for every point (one value per output) is read from the first point, as
        a likelihood whose noise is one parameter per output produces it.
        """
        C = self.problem.num_outputs
        per_point = noise.reshape(-1, C)
        detached = per_point.detach()
        if not torch.equal(detached, detached[:1].expand_as(detached)):
            return (dec.vectors * noise[:, None]).T @ dec.vectors, False
        if C == 1:
            return per_point[0].expand(dec.vectors.shape[1]), True
        uniform = bool((detached[0] == detached[0, 0]).all())
        return torch.einsum("c,cij->ij", per_point[0], dec.output_grams(C)), uniform

    def _system(self, delta: Tensor, noise: Tensor) -> _ProjectedSystem:
        """The approximation at ``(delta, noise)`` (see :class:`_ProjectedSystem`), differentiable."""
        dec = self.decomposition(delta)
        eig = dec.eigenvalues(delta)
        noise = noise.to(torch.float64)
        projected, uniform = self._projected_noise(dec, noise)
        if projected.dim() == 1:
            noise_factor, factor = projected.sqrt(), (projected + eig).sqrt()
        else:
            noise_factor = torch.linalg.cholesky(projected)
            factor = torch.linalg.cholesky(projected + torch.diag_embed(eig))
        return _ProjectedSystem(dec.vectors, eig, noise, noise_factor, factor, uniform)

    # ------------------------------------------------------------ the contract
    def inv_quad_logdet(self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool) -> tuple[Tensor, Tensor]:
        system = self._system(delta, noise)
        zero = torch.zeros((), dtype=torch.float64, device=system.vectors.device)
        inv_quad, log_det = zero, zero
        rotation = self.layout.num_groups > 1 and torch.is_grad_enabled() and delta.requires_grad
        if rhs is not None:
            inv_quad, coefficients = system.inv_quad(rhs.to(torch.float64))
            if rotation:
                inv_quad = inv_quad - self._rotation_gradient(delta, coefficients.detach())
        if logdet:
            log_det = system.log_det()
            if rotation and not system.uniform:
                # d log|V + T| = tr((V + T)^{-1} dT) = tr(R R^T dT), R = L^{-T}: V + T = L L^T is not diagonal
                eye = torch.eye(system.factor.shape[0], dtype=torch.float64, device=system.factor.device)
                root = torch.linalg.solve_triangular(system.factor.detach().T, eye, upper=True)
                log_det = log_det + self._rotation_gradient(delta, root).sum()
        return inv_quad, log_det

    def _rotation_gradient(self, delta: Tensor, columns: Tensor) -> Tensor:
        r"""Zero-valued terms ``(t,)`` whose ``delta`` gradients complete those of a function of :math:`T(\delta)`.

        The approximation depends on :math:`T(\delta) = U^\top K(\delta) U = \sum_g C_g/\delta_g`, diagonal
        (:math:`\Lambda`) at the decomposition point but not at nearby :math:`\delta` when ``G > 1``. For
        a function with :math:`\partial f/\partial T = F = \sum_t a_t a_t^\top` (``columns`` :math:`a_t`), the
        exact gradient is :math:`-\operatorname{tr}(F C_g)/\delta_g^2` with
        :math:`a_t^\top C_g a_t = \lVert J_g^\top U a_t\rVert^2` (one vjp per column); autograd through
        :math:`\Lambda(\delta)` gives only :math:`-\sum_i F_{ii} c_{ig}/\delta_g^2`. The terms returned have
        the gradient of the difference, :math:`-(a_t^\top C_g a_t - \sum_i a_{ti}^2 c_{ig})/\delta_g^2`.
        The quadratic form has :math:`F = -aa^\top`, :math:`a = (V + \Lambda)^{-1}U^\top r`; the
        log-determinant :math:`F = (V + \Lambda)^{-1}`, diagonal (no term needed) when :math:`S = \sigma^2 I`.
        """
        dec = self.decomposition(delta)
        pulled = self.pull(dec.vectors @ columns)  # shape: (t, P)
        full = self.layout.group_sums(pulled.square())  # shape: (t, G), a^T C_g a
        diagonal = columns.square().T @ dec.group_norms  # shape: (t, G), sum_i a_i^2 c_ig
        term = (full - diagonal) @ delta.to(torch.float64).reciprocal()
        return term - term.detach()

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        return self._system(delta, noise).solve(rhs.to(torch.float64))

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        M = self.size
        check_fits(8 * 2 * M * M, f"the dense low-rank kernel ({M} x {M})", self.network.device)
        system = self._system(delta, noise)
        vectors = system.kernel_vectors()
        return (vectors * system.eigenvalues) @ vectors.T + torch.diag_embed(system.noise)

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        with torch.no_grad():
            system = self._system(delta, noise)
            vectors, rhs = system.kernel_vectors(), rhs.to(torch.float64)
            return vectors @ (system.eigenvalues[:, None] * (vectors.T @ rhs)) + system.noise[:, None] * rhs

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        system = self._system(delta, noise)
        return system.kernel_vectors().square() @ system.eigenvalues + system.noise

    def bilinear_derivative(self, delta: Tensor, noise: Tensor, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        r"""Gradients of :math:`\sum_t l_t^\top (\tilde U T(\delta) \tilde U^\top + S) r_t` (see
        :meth:`_rotation_gradient`): in ``delta``
        :math:`-\sum_t (J_g^\top U\tilde U^\top l_t)\cdot(J_g^\top U\tilde U^\top r_t)/\delta_g^2` (two vjps),
        in the noise :math:`l \odot r` plus the change of :math:`\tilde U` (by autograd)."""
        left, right = left.to(torch.float64), right.to(torch.float64)
        with torch.enable_grad():
            noise_leaf = noise.detach().to(torch.float64).requires_grad_(True)
            system = self._system(delta.detach(), noise_leaf)
            kernel_vectors = system.kernel_vectors()
            proj_left, proj_right = kernel_vectors.T @ left, kernel_vectors.T @ right  # shape: (k, t)
            value = (proj_left * system.eigenvalues[:, None] * proj_right).sum() + (
                left * right * noise_leaf[:, None]
            ).sum()
            (grad_noise,) = torch.autograd.grad(value, noise_leaf)
        vectors = system.vectors
        pulled_left = self.pull(vectors @ proj_left.detach())  # shape: (t, P)
        pulled_right = self.pull(vectors @ proj_right.detach())
        per_group = self.layout.group_sums((pulled_left * pulled_right).sum(0))
        grad_delta = -per_group / delta.detach().to(torch.float64).square()
        return grad_delta.to(delta.dtype), grad_noise.to(noise.dtype)

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> LowRankPosterior:
        r"""Weights :math:`\bar\theta = P_0^{-1}J^\top\alpha` (:math:`\alpha` per ``spec.mean``, see
        the module docstring); :math:`W = P_0^{-1} J^\top U L^{-\top}`, :math:`LL^\top = V + \Lambda`."""
        system = self._system(delta.detach(), noise.detach())
        residual = residual.to(torch.float64).reshape(-1, 1)
        _, coefficients, rest = system.parts(residual)
        alpha = system.vectors @ coefficients  # shape: (M, 1), projected
        if self.spec.mean == "complement":
            alpha = alpha + rest / system.noise[:, None]
        factor = system.factor
        whitened = (  # U L^{-T}
            system.vectors / factor
            if factor.dim() == 1
            else torch.linalg.solve_triangular(factor, system.vectors.T, upper=False).T
        )
        columns = torch.cat([whitened, alpha], 1)  # shape: (M, k + 1): one pass of vjps for both
        pulled = self.directions(delta, columns, columns.new_ones(columns.shape[1]))  # shape: (P, k + 1)
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
