r"""Exact solves in kernel (function) space: Cholesky of :math:`K + S`, ``(N*C)`` square.

Built once: the per-group Gram matrices :math:`K_g = J_g(X) J_g(X)^\top`, ``(G, M, M)``.
Each evaluation: :math:`K(\delta) = \sum_g K_g/\delta_g` (``G M^2``), one Cholesky
(``M^3/3``). Cost is independent of the number of parameters P after the build.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.cholesky import cholesky, cholesky_solve, factored_inv_quad_logdet
from ntkgp.memory import KERNEL_SPACE_MATRICES, check_fits
from ntkgp.ntk import NTKProblem, gram
from ntkgp.posteriors.kernel_space import KernelSpacePosterior
from ntkgp.solvers.base import GaussianSolver

__all__ = ["KernelSpaceSolver", "refuse_sharded"]

#: why the exact kernel-space route does not take a process group
SHARDED_KERNEL_SPACE = (
    "the exact kernel-space solver factors the whole N C x N C training covariance on one process, so it does "
    "not shard over a process group; with process_group use solver='weight' (P < N C), or an approximate "
    "route: ntkgp.solvers.ConjugateGradients (the same GP to a stated tolerance, row-sharded), Inducing or "
    "SubsetOfData"
)


def refuse_sharded(problem: NTKProblem) -> None:
    """Raise a ``ValueError`` when ``problem`` is sharded over processes (kernel space needs all its rows)."""
    if problem.sharding.distributed:
        raise ValueError(SHARDED_KERNEL_SPACE)


class KernelSpaceSolver(GaussianSolver):
    """Cholesky of the ``(N*C) x (N*C)`` kernel plus noise, from cached per-group Grams."""

    name = "kernel"
    _WHAT = "the training kernel plus noise (K + S)"

    def __init__(self, problem: NTKProblem, *, grams: Tensor | None = None) -> None:
        refuse_sharded(problem)
        super().__init__(problem)
        M, G = self.size, self.layout.num_groups
        check_fits(
            8 * (G + KERNEL_SPACE_MATRICES) * M * M + problem.budget,
            f"the kernel-space solver ({G} + {KERNEL_SPACE_MATRICES} matrices of {M} x {M}, evidence and gradient)",
            self.network.device,
        )
        #: per-group Gram matrices, ``(G, M, M)``, float64 (given when extended, :mod:`ntkgp.solvers.update`)
        self.grams = gram(self.ntk, problem.x) if grams is None else grams
        self._spectrum: tuple[Tensor, Tensor] | None = None
        self._whitened: tuple[tuple[Tensor, Tensor], Tensor, Tensor] | None = None

    def whitened_residual(self, delta: Tensor, noise: Tensor, residual: Tensor) -> Tensor | None:
        r""":math:`z = L^{-1}r` ``(M, 1)`` of the last posterior's residual :math:`r` (``(M, 1)``, float64), kept
        when that posterior was at these hyperparameters and had this residual; else ``None``.

        An extended solver (:mod:`ntkgp.solvers.update`) continues it by the new rows' forward substitution.
        """
        held = self._whitened
        if held is None or not _same(held[0], (delta, noise)) or not _same((held[1],), (residual,)):
            return None
        return held[2]

    def keep_whitened(self, delta: Tensor, noise: Tensor, residual: Tensor, whitened: Tensor) -> None:
        """Keep ``whitened`` :math:`= L^{-1}r` of the posterior at ``(delta, noise)`` with residual ``residual``."""
        self._whitened = ((delta.detach().clone(), noise.detach().clone()), residual.detach().clone(), whitened)

    @torch.no_grad()
    def spectrum(self) -> tuple[Tensor, Tensor]:
        r"""Eigenvalues ``(M,)`` (ascending) and eigenvectors ``(M, M)`` of the one group's Gram :math:`K_1`, cached.

        With :math:`K = K_1/\delta` and noise :math:`\sigma^2 I`, :math:`K + S = U\,\mathrm{diag}(\lambda/\delta +
        \sigma^2)\,U^\top`: after this one ``eigh`` the evidence and its derivatives cost ``O(M)``.
        """
        if self.layout.num_groups != 1:
            raise ValueError(f"spectrum() needs one prior group; this layout has {self.layout.num_groups}")
        if self._spectrum is None:
            values, vectors = torch.linalg.eigh(self.grams[0])
            self._spectrum = (values.clamp_min(0.0), vectors)
        return self._spectrum

    def factor(self, delta: Tensor, noise: Tensor) -> Tensor:
        """The cached Cholesky factor of :math:`K + S` at these hyperparameters."""
        return self.cached_factor(lambda: cholesky(self.dense(delta, noise), what=self._WHAT), delta, noise)

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        kernel = self.layout.weighted(delta.to(torch.float64).reciprocal(), self.grams)  # a new (M, M) tensor
        kernel.diagonal().add_(noise.to(torch.float64).expand(kernel.shape[0]))
        return kernel

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.dense(delta, noise) @ rhs.to(torch.float64)

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        inv = delta.to(torch.float64).reciprocal()
        return inv @ self.grams.diagonal(dim1=-2, dim2=-1) + noise.to(torch.float64)

    def inv_quad_logdet(self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool) -> tuple[Tensor, Tensor]:
        factor, matrix = self.factor_and_matrix(lambda: self.dense(delta, noise), self._WHAT, delta, noise)
        inv_quad, log_det = factored_inv_quad_logdet(factor, None if rhs is None else rhs.to(torch.float64), matrix)
        return inv_quad, log_det if logdet else torch.zeros_like(log_det)

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        return cholesky_solve(rhs.to(torch.float64), self.factor(delta, noise))

    def bilinear_derivative(self, delta: Tensor, noise: Tensor, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        left, right = left.to(torch.float64), right.to(torch.float64)
        quad = torch.einsum("it,gij,jt->g", left, self.grams, right)
        grad_delta = (-quad / delta.detach().to(torch.float64).square()).to(delta.dtype)
        return grad_delta, (left * right).sum(-1).to(noise.dtype)

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> KernelSpacePosterior:
        delta, noise = delta.detach(), noise.detach()
        factor = self.factor(delta, noise)
        r = residual.to(torch.float64).reshape(-1, 1)
        z = torch.linalg.solve_triangular(factor, r, upper=False)
        self.keep_whitened(delta, noise, r, z)
        alpha = torch.linalg.solve_triangular(factor.mT, z, upper=True)
        return KernelSpacePosterior(self.problem, delta, factor, self.posterior_weights(delta, alpha[:, 0]))


def _same(old: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> bool:
    return len(old) == len(new) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(old, new))
