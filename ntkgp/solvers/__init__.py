r"""Solvers for the NTK GP on its training data: exact ones, the rule that picks one, and the
approximate routes for large N (:class:`Inducing`, :class:`Lanczos`, :class:`ConjugateGradients`,
:class:`SubsetOfData`, passed as ``LinearizedGP(..., solver=spec)``; see ``docs/solvers.md``).

* :class:`KernelSpaceSolver`: Cholesky of :math:`K + S`, ``(N C)^3/3`` per evaluation,
  ``G (N C)^2`` floats cached;
* :class:`WeightSpaceSolver`: Cholesky of :math:`P_0 + J^\top S^{-1} J`, ``P^3/3`` per
  evaluation, ``C P^2`` floats cached.

``solver="auto"`` takes the weight-space form when ``P < N C``, else kernel space
(:mod:`ntkgp.solvers.select`). Both are direct: no CG, no stochastic trace estimates.
"""

from ntkgp.errors import NoiseVariesError, NotPositiveDefiniteError
from ntkgp.solvers.base import (
    EvidenceOnlyGaussianSolver,
    GaussianSolver,
    LaplaceSolver,
    SolverBase,
    SolverSpec,
    output_noise,
)
from ntkgp.solvers.conjugate_gradients import CGInfo, CGSolver, ConjugateGradients
from ntkgp.solvers.inducing import Inducing, InducingLaplaceSolver, InducingSolver
from ntkgp.solvers.kernel_space import KernelSpaceSolver
from ntkgp.solvers.lanczos import Lanczos, LanczosLaplaceSolver, LanczosSolver
from ntkgp.solvers.laplace import KernelSpaceLaplaceSolver, WeightSpaceLaplaceSolver
from ntkgp.solvers.select import ExactSolverName, choose_space, make_laplace_solver, make_solver
from ntkgp.solvers.subset_of_data import SubsetOfData, SubsetOfDataLaplaceSolver, SubsetOfDataSolver
from ntkgp.solvers.weight_space import WeightSpaceSolver

__all__ = [
    "CGInfo",
    "CGSolver",
    "ConjugateGradients",
    "EvidenceOnlyGaussianSolver",
    "ExactSolverName",
    "GaussianSolver",
    "Inducing",
    "InducingLaplaceSolver",
    "InducingSolver",
    "KernelSpaceLaplaceSolver",
    "KernelSpaceSolver",
    "Lanczos",
    "LanczosLaplaceSolver",
    "LanczosSolver",
    "LaplaceSolver",
    "NoiseVariesError",
    "NotPositiveDefiniteError",
    "SolverBase",
    "SolverSpec",
    "SubsetOfData",
    "SubsetOfDataLaplaceSolver",
    "SubsetOfDataSolver",
    "WeightSpaceLaplaceSolver",
    "WeightSpaceSolver",
    "choose_space",
    "make_laplace_solver",
    "make_solver",
    "output_noise",
]
