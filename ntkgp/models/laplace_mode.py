r"""Where a Laplace GP takes its approximation: at the network's MAP or at the linearized model's own mode.

``LinearizedGP(..., mode="map" | "linearized" | "auto")`` for non-Gaussian likelihoods; ``"map"`` is
the default, ``"auto"`` finds the linearized model's mode (:mod:`ntkgp.solvers.mode`) when half the squared
Newton decrement at :math:`\hat\theta`, under the stated prior, exceeds
:data:`~ntkgp.solvers.mode.AUTO_DECREMENT` nats; it is resolved once, on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from torch import Tensor

from ntkgp.likelihoods.base import LaplaceLikelihood
from ntkgp.solvers.base import SolverSpec
from ntkgp.solvers.laplace import KernelSpaceLaplaceSolver, WeightSpaceLaplaceSolver
from ntkgp.solvers.mode import LinearizedMode
from ntkgp.solvers.select import choose_space

if TYPE_CHECKING:
    from ntkgp.models.linearized_gp import LinearizedGP

__all__ = ["LaplaceModeMixin"]


def _log_likelihood(
    likelihood: LaplaceLikelihood, targets: Tensor, total: Callable[[Tensor], Tensor], f: Tensor
) -> Tensor:
    r""":math:`\log p(y \mid f)` summed over every rank's points (``total`` is the sharding's all-reduced sum)."""
    return total(likelihood.log_likelihood(f, targets))


class LaplaceModeMixin:
    """``mode`` and ``mode_finder`` of :class:`~ntkgp.LinearizedGP` (see the module docstring)."""

    @property
    def mode(self) -> str:
        """``"map"`` or ``"linearized"``: where the Laplace approximation is taken (``"auto"`` resolved once)."""
        model = cast("LinearizedGP", self)
        if model._linearized is None:
            model._linearized = self._resolve_mode()
        return "linearized" if model._linearized else "map"

    @property
    def mode_finder(self) -> LinearizedMode | None:
        """Newton for the linearized model's mode (:mod:`ntkgp.solvers.mode`); ``None`` in ``"map"`` mode."""
        model = cast("LinearizedGP", self)
        return model._mode_finder if self.mode == "linearized" else None

    def _resolve_mode(self) -> bool:
        model = cast("LinearizedGP", self)
        likelihood = model.likelihood
        if not isinstance(likelihood, LaplaceLikelihood) or isinstance(model._solver_choice, SolverSpec):
            return False
        if model._mode_choice == "map":
            return False
        space = choose_space(model.problem, model._solver_choice)
        log_likelihood = functools.partial(_log_likelihood, likelihood, model.train_targets, model.problem.sharding.sum)
        model._mode_finder = LinearizedMode(model.problem, log_likelihood, likelihood.hessian_root, space)
        stated = model.layout.initial_precision.to(model.network.device)
        solver = model.solver
        assert isinstance(solver, (KernelSpaceLaplaceSolver, WeightSpaceLaplaceSolver))  # exact Laplace (above)
        model._mode_finder.initial_solver = solver  # at the first iterate: Newton starts from it, never rebuilds it
        return model._mode_choice == "linearized" or model._mode_finder.is_away_from(stated, solver)
