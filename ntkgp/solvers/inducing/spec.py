r"""The inducing-point route's settings: ``LinearizedGP(..., solver=ntkgp.solvers.Inducing(num_inducing=500))``.

See :mod:`ntkgp.solvers.inducing` for the bound and the predictive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ntkgp.ntk import NTKProblem
from ntkgp.solvers.base import SolverSpec
from ntkgp.solvers.inducing.gaussian import InducingSolver
from ntkgp.solvers.inducing.laplace import InducingLaplaceSolver
from ntkgp.solvers.inducing.selection import DEFAULT_POOL_SIZE, SelectionRule, select_inducing_points

__all__ = ["Inducing"]


@dataclass
class Inducing(SolverSpec):
    r"""Inducing-point route: ``LinearizedGP(..., solver=ntkgp.solvers.Inducing(num_inducing=500))``.

    Parameters
    ----------
    num_inducing:
        ``M``, the number of inducing points (each carries all ``C`` outputs).
    selection:
        ``"auto"`` (default: ``"kmeans"`` on floating-point inputs, ``"random"`` for token ids),
        ``"kmeans"`` (k-means on the flattened floating-point inputs, centres snapped to training points),
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
        Random source for the selection (default: a generator seeded with ``0``; the global RNG
        is never used).
    """

    num_inducing: int = 500
    selection: SelectionRule | Tensor = "auto"
    pool_size: int = DEFAULT_POOL_SIZE
    jitter: float = 1e-8
    generator: torch.Generator | None = None
    mean: Literal["posterior", "network"] = "posterior"
    prior_residual: bool = True

    def __post_init__(self) -> None:
        self._check_choice("mean", ("posterior", "network"))

    def _indices(self, problem: NTKProblem) -> Tensor:
        return select_inducing_points(
            self.selection, problem, self.num_inducing, pool_size=self.pool_size, generator=self.generator
        )

    def gaussian(self, problem: NTKProblem) -> InducingSolver:
        return InducingSolver(
            problem, self._indices(problem), self.jitter, mean=self.mean, prior_residual=self.prior_residual
        )

    def laplace(self, problem: NTKProblem, hessian_root: Tensor) -> InducingLaplaceSolver:
        return InducingLaplaceSolver(
            problem, self._indices(problem), self.jitter, hessian_root, prior_residual=self.prior_residual
        )
