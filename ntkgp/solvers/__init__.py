r"""Solvers for the NTK GP on its training data: exact ones, the rule that picks one, and the
approximate routes for large N (:class:`Inducing`, :class:`Lanczos`, :class:`ConjugateGradients`,
:class:`SubsetOfData`, passed as ``LinearizedGP(..., solver=spec)``; see ``docs/solvers.md``).

* :class:`KernelSpaceSolver`: Cholesky of :math:`K + S`, ``(N C)^3/3`` per evaluation,
  ``G (N C)^2`` floats cached;
* :class:`WeightSpaceSolver`: Cholesky of :math:`P_0 + J^\top S^{-1} J`, ``P^3/3`` per
  evaluation, ``C P^2`` floats cached.

``solver="auto"`` takes the weight-space form when ``P < N C`` (as the design asks), else
kernel space. Both are direct: no CG, no stochastic trace estimates.
"""

from __future__ import annotations

from torch import Tensor

from ntkgp.cholesky import NotPositiveDefiniteError, cholesky
from ntkgp.functional import FunctionalNetwork
from ntkgp.parameter_groups import ParameterGroups
from ntkgp.solvers.base import GaussianSolver, LaplaceSolver, Posterior, SolverBase, SolverSpec
from ntkgp.solvers.conjugate_gradients import CGSolver, ConjugateGradients
from ntkgp.solvers.inducing import Inducing, InducingLaplaceSolver, InducingPosterior, InducingSolver
from ntkgp.solvers.kernel_space import KernelSpacePosterior, KernelSpaceSolver
from ntkgp.solvers.lanczos import Lanczos, LanczosLaplaceSolver, LanczosSolver
from ntkgp.solvers.laplace import KernelSpaceLaplaceSolver, WeightSpaceLaplaceSolver, make_laplace_solver
from ntkgp.solvers.subset_of_data import SubsetOfData, SubsetOfDataLaplaceSolver, SubsetOfDataSolver
from ntkgp.solvers.weight_space import WeightSpacePosterior, WeightSpaceSolver

__all__ = [
    "SubsetOfData",
    "SubsetOfDataLaplaceSolver",
    "SubsetOfDataSolver",
    "CGSolver",
    "ConjugateGradients",
    "Posterior",
    "GaussianSolver",
    "KernelSpaceLaplaceSolver",
    "Inducing",
    "InducingLaplaceSolver",
    "InducingPosterior",
    "InducingSolver",
    "KernelSpacePosterior",
    "Lanczos",
    "LanczosLaplaceSolver",
    "LanczosSolver",
    "LaplaceSolver",
    "KernelSpaceSolver",
    "NotPositiveDefiniteError",
    "SolverBase",
    "SolverSpec",
    "WeightSpaceLaplaceSolver",
    "WeightSpacePosterior",
    "WeightSpaceSolver",
    "cholesky",
    "make_laplace_solver",
    "make_solver",
]

SOLVERS: dict[str, type[GaussianSolver]] = {"kernel": KernelSpaceSolver, "weight": WeightSpaceSolver}


def make_solver(
    solver: str,
    network: FunctionalNetwork,
    groups: ParameterGroups,
    x: Tensor,
    budget: int,
    *,
    noise_varies_over_data: bool = False,
) -> GaussianSolver:
    """Build the exact solver named ``solver`` (``"auto"``, ``"kernel"`` or ``"weight"``).

    ``"auto"`` picks weight space when ``P < N C`` and the noise is the same for every data
    point (the dual form needs that), else kernel space.
    """
    if solver == "weight" and noise_varies_over_data:
        raise ValueError(
            "solver='weight' needs noise that is the same for every data point; this likelihood's "
            "noise varies over the data (use solver='kernel' or 'auto')"
        )
    if solver == "auto":
        small_net = network.num_parameters < x.shape[0] * network.num_outputs
        solver = "weight" if small_net and not noise_varies_over_data else "kernel"
    if solver not in SOLVERS:
        raise ValueError(f"solver must be 'auto', 'kernel' or 'weight', got {solver!r}")
    return SOLVERS[solver](network, groups, x, budget)
