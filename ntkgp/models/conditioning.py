r"""New observations for a :class:`~ntkgp.LinearizedGP` without a rebuild.

:meth:`ConditioningMixin.add_data` appends points to the GP in place; :meth:`~ConditioningMixin.get_fantasy_model`
(GPyTorch's name) and :meth:`~ConditioningMixin.condition_on_observations` (BoTorch's) return a new
GP and leave this one as it is. The network is not retrained: the result is the GP a new
``LinearizedGP(net, likelihood, X', y')`` on all the data would be, at the current hyperparameters,
to round-off, and much cheaper:

* exact kernel-space solver: the per-group Grams are bordered with the new rows and the cached
  Cholesky factor of :math:`K + S` is extended by a block (:func:`~ntkgp.solvers.update.extend_kernel_solver`);
  the posterior then solves once with the factor (the old rows' :math:`L^{-1}r` is kept) and pulls
  its weights back through the training data's cached captures;
* exact weight-space solver: the new rows of :math:`J^\top J` and the rank-``kC`` term they add to
  the precision are kept apart from the cached matrix and factor, the latter in Woodbury form
  (:func:`~ntkgp.solvers.update.extend_weight_solver`, :class:`~ntkgp.linalg.woodbury.WoodburyFactor`),
  and the posterior weights' right-hand side is extended by the new rows: no ``P x P`` matrix is
  made and no pass over the old points;
* approximate solvers: the solver is rebuilt on the extended data on first use (their caches,
  such as inducing points chosen from the data, depend on all of it).

Gaussian likelihoods only: a Laplace GP is centred at the network's MAP on its training data,
which new data moves; retrain the network and build a new GP.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

import torch
from gpytorch.likelihoods import FixedNoiseGaussianLikelihood
from gpytorch.likelihoods.noise_models import FixedGaussianNoise
from torch import Tensor

from ntkgp._validation import check_targets
from ntkgp.errors import NoiseVariesError
from ntkgp.network.inputs import InputLike, Inputs
from ntkgp.ntk import NTKProblem
from ntkgp.posteriors.kernel_space import KernelSpacePosterior
from ntkgp.solvers.base import output_noise
from ntkgp.solvers.kernel_space import KernelSpaceSolver
from ntkgp.solvers.update import extend_kernel_solver, extend_weight_solver
from ntkgp.solvers.weight_space import WeightSpaceSolver

if TYPE_CHECKING:
    from ntkgp.models.linearized_gp import LinearizedGP

__all__ = ["ConditioningMixin"]


class ConditioningMixin:
    """``add_data``, ``get_fantasy_model`` and ``condition_on_observations`` of :class:`~ntkgp.LinearizedGP`."""

    def add_data(self, x: InputLike, y: Tensor, noise: Tensor | None = None) -> LinearizedGP:
        r"""Append ``k`` observations in place (see the module docstring) and return the GP.

        Parameters
        ----------
        x:
            New inputs, ``k`` examples in the training inputs' form.
        y:
            New targets, ``(k,)`` or ``(k, 1)`` for ``C = 1``, else ``(k, C)``.
        noise:
            ``FixedNoiseGaussianLikelihood`` only (and required there): the new points' noise
            variances, ``(k,)``. Other likelihoods' noise is a hyperparameter shared by all points.
        """
        model = cast("LinearizedGP", self)
        if model.problem.sharding.distributed:
            raise NotImplementedError(
                "add_data / get_fantasy_model on a GP sharded over a process group: build a new LinearizedGP with "
                "every rank's new points in its shard"
            )
        if model.is_laplace:
            raise NotImplementedError(
                "a Laplace GP (non-Gaussian likelihood) is centred at the network's MAP on its training data, and "
                "new observations move that MAP: retrain the network on all the data and build a new LinearizedGP"
            )
        x_new = model.inputs(x).detach()
        x_new.check("x", device=model.network.device)
        if x_new.float_dtype is not None and x_new.float_dtype != model.network.dtype:
            x_new = x_new.to(float_dtype=model.network.dtype)
        y_new = check_targets(y.detach(), x_new.num, model.num_outputs, model.network.device)
        model._extend_noise(x_new.num, noise)
        old_solver, old_posterior = model._solver, model._posterior
        x_all = Inputs.concat([model.train_x, x_new])
        model.train_inputs = (x_all.flat(),) if x_all.form == "tensor" else tuple(t for _, t in x_all.tensors())
        model.train_targets = torch.cat([model.train_targets, y_new.to(model.train_targets.dtype)])
        model.problem = NTKProblem(model.ntk, x_all)
        with torch.no_grad():
            if model._train_mean_cache is not None:
                new_mean = model.mean_module(x_new).to(torch.float64)
                model._train_mean_cache = torch.cat([model._train_mean_cache, new_mean])
            model._posterior = None
            model._solver = model._extended_solver(old_solver, old_posterior, x_new)
        return model

    def _extend_noise(self, k: int, noise: Tensor | None) -> None:
        model = cast("LinearizedGP", self)
        likelihood = model.likelihood
        if not isinstance(likelihood, FixedNoiseGaussianLikelihood):
            if noise is not None:
                raise ValueError(
                    f"noise= is for FixedNoiseGaussianLikelihood; the noise of {type(likelihood).__name__} is a "
                    "hyperparameter shared by all points"
                )
            return
        if noise is None:
            raise ValueError("a FixedNoiseGaussianLikelihood needs noise= (one variance per new point)")
        old = likelihood.noise.detach()
        new = torch.as_tensor(noise, dtype=old.dtype, device=old.device).reshape(-1).expand(k)
        if old.numel() == 1 and torch.equal(new, old.expand(k)):
            return  # one noise value for all points, the new ones included
        likelihood.noise_covar = FixedGaussianNoise(noise=torch.cat([old.expand(model.num_data), new]))

    def _extended_solver(self, solver: Any, posterior: Any, x_new: Inputs) -> Any:
        """The solver on the extended data: updated when exact, ``None`` (rebuilt on first use) otherwise."""
        model = cast("LinearizedGP", self)
        delta, noise = model.prior_precision.detach(), model.noise_diagonal().detach()
        if isinstance(solver, KernelSpaceSolver):
            caps = None  # the training captures, when the cached posterior holds them
            if posterior is not None and isinstance(posterior[1], KernelSpacePosterior):
                caps = posterior[1].kernel.reference_captures or None
            return extend_kernel_solver(solver, x_new, delta, noise, caps)
        if isinstance(solver, WeightSpaceSolver):
            try:
                noise_c = output_noise(noise, model.num_outputs, "weight-space")
            except NoiseVariesError:
                if model._solver_choice != "auto":
                    raise
                model._solver_choice = "kernel"  # the new points' noise differs: what "auto" picks now
                return None
            return extend_weight_solver(solver, x_new, delta, noise_c)
        return None

    def get_fantasy_model(
        self, inputs: InputLike, targets: Tensor, noise: Tensor | None = None, **kwargs: Any
    ) -> LinearizedGP:
        """A new GP: this one with the observations ``(inputs, targets)`` added (:meth:`add_data`).

        The network, the NTK engine and the solver's caches are shared (never modified); the
        hyperparameters and the likelihood are copied. ``targets`` are one set of observations
        (``(k,)`` or ``(k, C)``): for batches of fantasies use :class:`ntkgp.botorch.LinearizedGPModel`.
        """
        model = cast("LinearizedGP", self)
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        expected = 1 if model.num_outputs == 1 else 2
        if targets.dim() > expected and not (model.num_outputs == 1 and targets.dim() == 2 and targets.shape[1] == 1):
            raise NotImplementedError(
                "batched fantasy targets are not supported by LinearizedGP.get_fantasy_model; "
                "ntkgp.botorch.LinearizedGPModel conditions on batches of fantasies"
            )
        return model._copy_sharing_caches().add_data(inputs, targets, noise=noise)

    def condition_on_observations(self, X: InputLike, Y: Tensor, noise: Tensor | None = None) -> LinearizedGP:
        """BoTorch's name for :meth:`get_fantasy_model` (one set of observations, a new GP)."""
        model = cast("LinearizedGP", self)
        return model.get_fantasy_model(X, Y, noise=noise)

    def _copy_sharing_caches(self) -> LinearizedGP:
        """A deep copy that shares the network, the NTK engine, the problem, the solver and the posterior."""
        model = cast("LinearizedGP", self)
        shared: list[Any] = [model.ntk, model.problem, model._solver, model._posterior, model._hessian_root]
        shared += [model._train_mean_cache, model.train_targets, *model.train_inputs]
        memo = {id(obj): obj for obj in shared if obj is not None}
        return copy.deepcopy(model, memo)
