r"""Picking the exact solver: weight space when the network is small, kernel space otherwise.

``solver="auto"`` takes the weight-space form when ``P < N C`` (and, for Gaussian likelihoods, the
noise is the same for every data point, which the dual form needs), else kernel space. Both are
direct: no CG, no stochastic trace estimates.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

from torch import Tensor

from ntkgp.errors import NoiseVariesError
from ntkgp.ntk import NTKProblem
from ntkgp.solvers.base import GaussianSolver, LaplaceSolver
from ntkgp.solvers.kernel_space import SHARDED_KERNEL_SPACE, KernelSpaceSolver
from ntkgp.solvers.laplace import KernelSpaceLaplaceSolver, WeightSpaceLaplaceSolver
from ntkgp.solvers.weight_space import WeightSpaceSolver

__all__ = ["ExactSolverName", "choose_space", "make_laplace_solver", "make_solver"]

#: The exact solvers by name.
ExactSolverName: TypeAlias = Literal["auto", "kernel", "weight"]


def choose_space(problem: NTKProblem, solver: str, *, noise_varies_over_data: bool = False) -> str:
    """``"weight"`` or ``"kernel"`` for ``solver`` (``"auto"``, ``"kernel"`` or ``"weight"``).

    Raises a ``ValueError`` for other names and :class:`~ntkgp.errors.NoiseVariesError` for
    ``"weight"`` with noise that varies over the data. With a process group (a sharded ``problem``)
    ``N C`` counts every rank's points, and kernel space, which does not shard, raises a ``ValueError``.
    """
    if solver not in ("auto", "kernel", "weight"):
        raise ValueError(f"solver must be 'auto', 'kernel', 'weight' or a SolverSpec, got {solver!r}")
    if solver == "weight" and noise_varies_over_data:
        raise NoiseVariesError(
            "solver='weight' needs noise that is the same for every data point; this likelihood's "
            "noise varies over the data (use solver='kernel' or 'auto')"
        )
    if solver == "auto":
        small_net = problem.network.num_parameters < problem.total_size
        solver = "weight" if small_net and not noise_varies_over_data else "kernel"
    if solver == "kernel" and problem.sharding.distributed:
        raise ValueError(SHARDED_KERNEL_SPACE)
    return solver


def make_solver(problem: NTKProblem, solver: str, *, noise_varies_over_data: bool = False) -> GaussianSolver:
    """The exact Gaussian solver named ``solver`` (see :func:`choose_space`)."""
    space = choose_space(problem, solver, noise_varies_over_data=noise_varies_over_data)
    return WeightSpaceSolver(problem) if space == "weight" else KernelSpaceSolver(problem)


def make_laplace_solver(problem: NTKProblem, solver: str, hessian_root: Tensor) -> LaplaceSolver:
    """The exact Laplace solver named ``solver`` (see :func:`choose_space`)."""
    space = choose_space(problem, solver)
    return (WeightSpaceLaplaceSolver if space == "weight" else KernelSpaceLaplaceSolver)(problem, hessian_root)
