r"""Subset of data: the exact GP on ``M`` of the ``N`` training points, the baseline of the
approximate routes.

With ``rescale_prior=True`` (the default) the subset kernel's prior variance is multiplied by
:math:`M/N`, i.e. the prior precisions by :math:`N/M`, as laplace-torch's ``FunctionalLaplace``
does with ``n_subset = M`` (its ``_prior_factor_sod``). The predictive covariance is then

.. math::
    \tfrac{M}{N}\Big[K_{**} - K_{*S}\big(K_{SS} + \tfrac{N}{M} S_S\big)^{-1} K_{S*}\Big].

This is a heuristic, not a bound. It stands for the :math:`N - M` points left out by shrinking
every direction of the prior, including those the subset does not constrain. On Friedman-1
(N = 10,000, M = 100) its variances were far closer to the exact GP's than the plain subset's
or the SGPR's, which keep the full prior variance there. With ``rescale_prior=False`` it is the
plain GP of the subset.

The evidence is the subset's, scaled by :math:`N/M` so that it stands for all ``N`` points.
It is a rough estimate with no bound, and it is comparable across hyperparameters, not with the
exact evidence. Prediction and evidence cost those of the exact kernel-space solver on ``M``
points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ntkgp._random import default_generator
from ntkgp.ntk import NTKProblem, gram
from ntkgp.ntk.sharded import gather_points, owned_points
from ntkgp.posteriors.base import Posterior
from ntkgp.posteriors.kernel_space import KernelSpacePosterior
from ntkgp.solvers.base import EvidenceOnlyGaussianSolver, LaplaceSolver, SolverBase, SolverSpec
from ntkgp.solvers.inducing.selection import check_count, checked_indices, random_points
from ntkgp.solvers.kernel_space import KernelSpaceSolver
from ntkgp.solvers.laplace import KernelSpaceLaplaceSolver

__all__ = ["SubsetOfData", "SubsetOfDataLaplaceSolver", "SubsetOfDataSolver"]


@dataclass
class SubsetOfData(SolverSpec):
    """Subset-of-data route: ``LinearizedGP(..., solver=ntkgp.solvers.SubsetOfData(num_points=1000))``.

    Parameters
    ----------
    num_points:
        ``M``, the number of training points kept (a uniform random subset), unless ``indices``.
    indices:
        The training points to keep, as an index tensor (overrides ``num_points``).
    rescale_prior:
        Multiply the prior variance by ``M / N`` (laplace-torch's convention; module docstring).
    mean:
        ``"posterior"`` (the subset GP's mean) or ``"network"`` (:math:`f(x_*;\\hat\\theta)`, as
        laplace-torch). Laplace likelihoods always use the network.
    generator:
        Random source for the subset (default: a generator seeded with ``0``; the global RNG is
        never used).
    """

    num_points: int = 1000
    indices: Tensor | None = None
    rescale_prior: bool = True
    mean: Literal["posterior", "network"] = "posterior"
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self._check_choice("mean", ("posterior", "network"))

    def _indices(self, n: int) -> Tensor:
        if self.indices is not None:
            return checked_indices(self.indices, n, "subset")
        check_count(self.num_points, n, "num_points")
        return random_points(n, self.num_points, default_generator(self.generator))

    def gaussian(self, problem: NTKProblem) -> SubsetOfDataSolver:
        return SubsetOfDataSolver(problem, self._indices(problem.total_data), self.rescale_prior, mean=self.mean)

    def laplace(self, problem: NTKProblem, hessian_root: Tensor) -> SubsetOfDataLaplaceSolver:
        return SubsetOfDataLaplaceSolver(problem, self._indices(problem.total_data), self.rescale_prior, hessian_root)


class _Subset:
    """Shared bookkeeping: the kept points, their rows, the prior and evidence scales.

    With a process group the indices are global; each rank holds the kept points of its shard
    (``rows`` are theirs), the subset's inputs are gathered on every rank, and its Gram is built by
    rows, each rank those of its own kept points, then gathered: the subset's exact GP is then the
    same on every rank.
    """

    def _setup(self, problem: NTKProblem, indices: Tensor, rescale_prior: bool) -> NTKProblem:
        n, C, device = problem.total_data, problem.num_outputs, problem.network.device
        self._shards = problem.sharding
        self.indices = indices.to(device)
        _, local = owned_points(problem, self.indices)
        #: this rank's kept points in its shard, and their rows in the point-major ``(N*C,)`` layout
        self.local = local
        self.rows = (local[:, None] * C + torch.arange(C, device=device)).reshape(-1)
        self._counts = self._shards.gather_counts(self.rows.numel(), device)
        #: N / M: multiplies the prior precisions (if rescaled) and the subset's evidence terms
        self.ratio = n / indices.numel()
        self.prior_scale = self.ratio if rescale_prior else 1.0
        return problem.on(gather_points(problem, self.indices))

    def _take(self, values: Tensor) -> Tensor:
        """The kept points' rows of a per-row tensor ``(N*C, ...)`` (with a process group: every rank's, gathered)."""
        return self._shards.gather_rows(values[self.rows], self._counts)

    def _grams(self, problem: NTKProblem, subset: NTKProblem) -> Tensor | None:
        """The subset's per-group Grams ``(G, MC, MC)`` built by rows over the ranks; ``None`` for one process."""
        if not self._shards.distributed:
            return None
        G, mc = problem.layout.num_groups, subset.size
        rows = torch.zeros(G, self.rows.numel(), mc, dtype=torch.float64, device=problem.network.device)
        if self.local.numel():
            rows = gram(problem.ntk, problem.x[self.local], subset.x)  # shape: (G, m_r C, M C)
        grams = self._shards.gather_rows(rows.transpose(0, 1).contiguous(), self._counts).transpose(0, 1)
        return 0.5 * (grams + grams.transpose(1, 2))


class SubsetOfDataSolver(_Subset, EvidenceOnlyGaussianSolver):
    """The exact kernel-space solver on the kept points, for a Gaussian likelihood."""

    name = "subset"

    def __init__(
        self,
        problem: NTKProblem,
        indices: Tensor,
        rescale_prior: bool,
        *,
        mean: str = "posterior",
    ) -> None:
        SolverBase.__init__(self, problem)
        subset = self._setup(problem, indices, rescale_prior)
        #: the exact solver of the subset (the same on every rank)
        self.inner = KernelSpaceSolver(subset, grams=self._grams(problem, subset))
        self.mean = mean

    def _noise(self, noise: Tensor) -> Tensor:
        return self._take(noise) if noise.dim() and noise.numel() > 1 else noise

    def inv_quad_logdet(self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool) -> tuple[Tensor, Tensor]:
        """The subset's terms at :math:`\\delta N/M` (if rescaled), times :math:`N/M`."""
        inv_quad, log_det = self.inner.inv_quad_logdet(
            delta * self.prior_scale, self._noise(noise), None if rhs is None else self._take(rhs), logdet
        )
        return self.ratio * inv_quad, self.ratio * log_det

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> Posterior:
        scaled = delta.detach() * self.prior_scale
        if self.mean == "network":
            factor = self.inner.factor(scaled, self._noise(noise.detach()))
            return KernelSpacePosterior(self.inner.problem, scaled, factor, self.network.flat_params.to(torch.float64))
        return self.inner.posterior(scaled, self._noise(noise.detach()), self._take(residual.reshape(-1)))


class SubsetOfDataLaplaceSolver(_Subset, LaplaceSolver):
    """The exact kernel-space Laplace solver on the kept points."""

    name = "subset"
    exact = False

    def __init__(self, problem: NTKProblem, indices: Tensor, rescale_prior: bool, hessian_root: Tensor) -> None:
        LaplaceSolver.__init__(self, problem, hessian_root)
        subset = self._setup(problem, indices, rescale_prior)
        C = problem.num_outputs
        roots = self._shards.gather_rows(hessian_root[self.local], [c // C for c in self._counts])
        self.inner = KernelSpaceLaplaceSolver(subset, roots, grams=self._grams(problem, subset))

    def log_det(self, delta: Tensor) -> Tensor:
        """:math:`\\tfrac{N}{M}\\log|I + B_S^\\top K_{SS} B_S|` at :math:`\\delta N/M` (if rescaled)."""
        return self.ratio * self.inner.log_det(delta * self.prior_scale)

    def laplace_posterior(self, delta: Tensor) -> Posterior:
        return self.inner.laplace_posterior(delta.detach() * self.prior_scale)
