r"""A trained network, linearized, as an exact GPyTorch GP."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gpytorch
import torch
from gpytorch.constraints import Interval
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.likelihoods import Likelihood
from gpytorch.mlls import AddedLossTerm
from gpytorch.models import GP, ExactGP
from linear_operator.operators import DiagLinearOperator, LinearOperator, ZeroLinearOperator
from torch import Tensor, nn

from ntkgp._references import drop_self_references
from ntkgp._validation import check_inputs, check_likelihood, check_module_device, check_targets
from ntkgp.functional import FunctionalNetwork
from ntkgp.kernels.ntk_kernel import NTKKernel
from ntkgp.likelihoods.base import LaplaceLikelihood
from ntkgp.means.linearized_mean import LinearizedMean
from ntkgp.operators.exact_ntk_covariance import ExactNTKCovariance
from ntkgp.operators.posterior_covariance import PosteriorCovariance
from ntkgp.parameter_groups import PriorPrecisionSpec
from ntkgp.solvers import GaussianSolver, LaplaceSolver, Posterior, SolverSpec, make_laplace_solver, make_solver

__all__ = ["LinearizedGP"]


class _CorrectionTerm(AddedLossTerm):
    """The approximate solver's evidence correction (the collapsed bound's trace term), as the
    GPyTorch added loss term that ``ExactMarginalLogLikelihood`` adds to the log likelihood."""

    def __init__(self, compute: Callable[[], Tensor]) -> None:
        self.compute = compute

    def loss(self, *params: Any) -> Tensor:
        return self.compute()


class LinearizedGP(ExactGP):
    r"""The linearized-Laplace GP of a trained network.

    With :math:`f_{\text{lin}}(x;\theta) = f(x;\hat\theta) + J(x)(\theta-\hat\theta)` and
    :math:`\theta\sim\mathcal N(0, P_0^{-1})` this is the GP with

    * mean :math:`m(x) = f(x;\hat\theta) - J(x)\hat\theta` (:class:`~ntkgp.means.LinearizedMean`);
    * kernel :math:`k(x,x') = J(x)P_0^{-1}J(x')^\top` (:class:`~ntkgp.kernels.NTKKernel`).

    Its log evidence equals the linearized-Laplace (GGN) log marginal likelihood at a MAP, and
    its predictive covariance equals the GLM predictive
    :math:`J_*(J^\top S^{-1}J + P_0)^{-1}J_*^\top` (see ``docs/math.md``).

    It is an ordinary GPyTorch ``ExactGP``: train the hyperparameters (prior precisions and
    the likelihood's noise) with ``ExactMarginalLogLikelihood`` and Adam over
    ``model.parameters()``; predict with ``model.eval()`` and ``likelihood(model(x))``.
    The network's weights are not among ``model.parameters()`` and are never changed.

    All linear algebra is exact (Cholesky), in float64, whatever N: in kernel space
    (``(N C)^3``) or, when the network has fewer parameters than ``N C``, in weight space
    (``P^3``). What does not depend on the hyperparameters (per-group Grams, or
    :math:`J^\top J`) is computed once, at construction.

    Parameters
    ----------
    net:
        The trained network, mapping ``(n, *input_shape)`` to ``(n, C)`` (or ``(n,)``). Put
        BatchNorm/Dropout networks in eval mode first.
    likelihood:
        Regression (exact GP): ``GaussianLikelihood`` or ``FixedNoiseGaussianLikelihood``
        (``C = 1``), or ``MultitaskGaussianLikelihood(num_tasks=C)`` with ``rank=0``.
        Classification and heteroscedastic regression (the Laplace GP at the MAP, with the
        per-point GGN blocks :math:`\Lambda_n`): ``ntkgp.likelihoods.SoftmaxLikelihood``,
        ``BernoulliLikelihood`` or ``NaturalGaussianLikelihood``; fit their prior precisions
        with ``ntkgp.mlls.LaplaceMarginalLogLikelihood``.
    train_x:
        Training inputs ``(N, *input_shape)``, floating point, on the network's device.
    train_y:
        Targets ``(N,)`` for ``C = 1`` or ``(N, C)``; integer labels ``(N,)`` for softmax.
    prior_precision:
        :math:`\delta`: a number, one value per parameter tensor, or ``{module name: value}``.
    prior_precision_constraint:
        Positivity constraint of :math:`\delta` (default ``gpytorch.constraints.Positive()``,
        softplus). ``Positive(transform=torch.exp, inv_transform=torch.log)`` makes the raw
        parameter :math:`\log\delta`, so optimizer steps are relative (see ``docs/marglik.md``).
    solver:
        Exact: ``"auto"`` (weight space if ``P < N C``, else kernel space), ``"kernel"`` or
        ``"weight"``. Approximate, for large N (``docs/solvers.md``): a
        :class:`~ntkgp.solvers.SolverSpec` such as ``ntkgp.solvers.Inducing(num_inducing=500)``.
    chunk_size:
        Examples per chunk in passes over data (default: about 2**25 Jacobian entries).
    memory_budget:
        Bytes for Jacobian blocks (default: a quarter of free memory, at most 4 GiB).
    progress:
        Show tqdm progress bars on long passes.
    """

    def __init__(
        self,
        net: nn.Module,
        likelihood: Likelihood,
        train_x: Tensor,
        train_y: Tensor,
        prior_precision: PriorPrecisionSpec = 1.0,
        *,
        prior_precision_constraint: Interval | None = None,
        solver: str | SolverSpec = "auto",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        progress: bool = False,
    ) -> None:
        check_inputs(train_x, "train_x")
        network = FunctionalNetwork(net, train_x.shape[1:], chunk_size=chunk_size, progress=progress)
        check_inputs(train_x, "train_x", device=network.device)
        if train_x.dtype != network.dtype:
            raise TypeError(f"train_x has dtype {train_x.dtype} but the network's parameters are {network.dtype}")
        num_data = train_x.shape[0]
        check_module_device(likelihood, "likelihood", network.device)
        if isinstance(likelihood, LaplaceLikelihood):
            if likelihood.num_outputs != network.num_outputs:
                raise ValueError(
                    f"the network has {network.num_outputs} outputs but {type(likelihood).__name__} expects "
                    f"{likelihood.num_outputs}"
                )
            train_y = likelihood.check_targets(train_y, num_data)
            check_inputs(train_y.to(torch.float64), "train_y", device=network.device)
        else:
            check_likelihood(likelihood, network.num_outputs)
            train_y = check_targets(train_y, num_data, network.num_outputs, network.device)
        flat_x = train_x.reshape(num_data, -1)
        # ExactGP.__init__ without its Gaussian-only check: the Laplace likelihoods are handled here.
        GP.__init__(self)
        self.train_inputs, self.train_targets = (flat_x,), train_y
        self.likelihood, self.prediction_strategy = likelihood, None

        self.network = network
        self.mean_module = LinearizedMean(network)
        self.covar_module = NTKKernel(network, prior_precision, prior_precision_constraint=prior_precision_constraint,
                                      memory_budget=memory_budget)
        self._flat_x = flat_x  # the inputs the solver and the mean are built from (not cast by .float())
        self._train_mean_cache: Tensor | None = None  # m(X), computed on first use (one jvp pass)
        groups, budget = self.covar_module.groups, self.covar_module.memory_budget
        if not isinstance(solver, SolverSpec) and solver not in ("auto", "kernel", "weight"):
            raise ValueError(f"solver must be 'auto', 'kernel', 'weight' or a SolverSpec, got {solver!r}")
        if isinstance(likelihood, LaplaceLikelihood):
            f_hat = network.forward(flat_x).to(torch.float64)
            likelihood.check_outputs(f_hat)
            #: :math:`\log p(y \mid \hat f)` at the MAP
            self.map_log_likelihood = likelihood.log_likelihood(f_hat, train_y)
            factor = likelihood.hessian_factor(f_hat)
            if isinstance(solver, SolverSpec):
                self._build_solver = lambda: solver.laplace(network, groups, flat_x, budget, factor)
            else:
                self._build_solver = lambda: make_laplace_solver(solver, network, groups, flat_x, budget, factor)
        else:
            varies = self._noise_varies_over_data()
            if solver == "weight" and varies:
                raise ValueError(
                    "solver='weight' needs noise that is the same for every data point; this likelihood's "
                    "noise varies over the data (use solver='kernel' or 'auto')"
                )
            if isinstance(solver, SolverSpec):
                self._build_solver = lambda: solver.gaussian(network, groups, flat_x, budget)
            else:
                self._build_solver = lambda: make_solver(solver, network, groups, flat_x, budget,
                                                         noise_varies_over_data=varies)
        self._solver: GaussianSolver | LaplaceSolver | None = None
        if isinstance(solver, SolverSpec):
            self.register_added_loss_term("approximation_correction")
        self._posterior: tuple[tuple[Tensor, ...], Posterior] | None = None
        # freed as soon as the last reference goes, not at the next garbage collection
        drop_self_references(self)

    def _noise_varies_over_data(self) -> bool:
        """Whether the likelihood's noise differs between data points (per-point fixed noise)."""
        with torch.no_grad():
            per_point = self._noise().reshape(-1, self.num_outputs)
        return not torch.equal(per_point, per_point[:1].expand_as(per_point))

    def set_train_data(self, inputs: Any = None, targets: Any = None, strict: bool = True) -> None:
        """Not supported: the solver caches Grams of the training inputs. Build a new LinearizedGP."""
        raise NotImplementedError(
            "LinearizedGP caches Jacobian products of its training data; build a new LinearizedGP "
            "for new training inputs or targets"
        )

    # ------------------------------------------------------------ properties
    @property
    def solver(self) -> GaussianSolver | LaplaceSolver:
        """The solver, built on first use: it caches what does not depend on the hyperparameters
        (Gram matrices or :math:`J^\\top J` of the training data for the exact solvers; the memory
        check, and a :class:`~ntkgp.KernelTooLargeError`, happen then)."""
        if self._solver is None:
            self._solver = self._build_solver()
        return self._solver

    @property
    def _train_mean(self) -> Tensor:
        r"""The prior mean at the training inputs, :math:`m(X) = f(X) - J(X)\hat\theta`, float64.

        Computed on first use: the subset bound and the Laplace evidence never need it."""
        if self._train_mean_cache is None:
            self._train_mean_cache = self.mean_module(self._flat_x).to(torch.float64)
        return self._train_mean_cache

    @property
    def prior_precision(self) -> Tensor:
        r""":math:`\delta`, one per parameter group, shape ``(G,)``."""
        return self.covar_module.prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self.covar_module.prior_precision = value

    @property
    def num_outputs(self) -> int:
        """C, the number of network outputs."""
        return self.network.num_outputs

    @property
    def num_data(self) -> int:
        """N, the number of training points."""
        return self.train_inputs[0].shape[0]

    @property
    def is_laplace(self) -> bool:
        """Whether the likelihood is non-Gaussian (Laplace approximation at the MAP)."""
        return isinstance(self.likelihood, LaplaceLikelihood)

    # ---------------------------------------------------------- distributions
    def _flatten(self, x: Tensor) -> Tensor:
        check_inputs(x, "x", device=self.network.device)
        shape = self.network.input_shape
        if tuple(x.shape[1:]) == tuple(shape) or (x.dim() == 2 and x.shape[1] == shape.numel()):
            return x.reshape(x.shape[0], -1)
        raise ValueError(
            f"inputs have shape {tuple(x.shape)}; expected (n, {', '.join(map(str, shape))}) "
            f"or flattened (n, {shape.numel()})"
        )

    def _distribution(self, mean: Tensor, covar: LinearOperator) -> MultivariateNormal:
        if self.num_outputs == 1:
            return MultivariateNormal(mean.reshape(-1), covar)
        return MultitaskMultivariateNormal(mean.reshape(-1, self.num_outputs), covar, interleaved=True)

    def forward(self, x: Tensor) -> MultivariateNormal:
        """The GP prior at ``x`` with the lazy NTK operator (no solves)."""
        return self._distribution(self.mean_module(x), self.covar_module(x).evaluate_kernel())

    def _training_covariance(self, prior_precision: Tensor) -> ExactNTKCovariance:
        zeros = torch.zeros(self.solver.size, dtype=torch.float64, device=self.network.device)
        return ExactNTKCovariance(prior_precision, zeros, solver=self.solver)

    def __call__(self, *args: Any, **kwargs: Any) -> MultivariateNormal:
        x = self._flatten(args[0])
        if gpytorch.settings.prior_mode.on():
            return self.forward(x)
        if self.training:
            train_x = self.train_inputs[0]
            if x.shape != train_x.shape or not torch.equal(x, train_x):
                raise RuntimeError(
                    "in train mode LinearizedGP must be called on its training inputs "
                    "(call model.eval() to predict elsewhere)"
                )
            if self.is_laplace:  # the prior at the training inputs; the evidence is log_evidence()
                return self._distribution(self._train_mean, self.covar_module(x).evaluate_kernel())
            if not self.solver.exact:
                delta = self.prior_precision
                self.update_added_loss_term(
                    "approximation_correction", _CorrectionTerm(lambda: self.solver.correction(delta, self._noise()))
                )
            return self._distribution(self._train_mean, self._training_covariance(self.prior_precision))
        posterior = self.posterior()
        return self._distribution(posterior.mean(x), PosteriorCovariance(x, posterior=posterior))

    # ------------------------------------------------------------- posterior
    def _noise(self) -> Tensor:
        """The likelihood's noise on the training data, ``(N*C,)``, differentiable in its parameters."""
        m = self.num_data * self.num_outputs
        zero = ZeroLinearOperator(m, m, dtype=torch.float64, device=self.network.device)
        mean = torch.zeros(m, dtype=torch.float64, device=self.network.device)  # the noise does not depend on it
        noise = self.likelihood(self._distribution(mean, zero)).lazy_covariance_matrix
        if not isinstance(noise, DiagLinearOperator):
            raise NotImplementedError(f"the likelihood's noise must be diagonal, got {type(noise).__name__}")
        return noise.diagonal().to(torch.float64).expand(m)

    def _residual(self) -> Tensor:
        return (self.train_targets.to(torch.float64) - self._train_mean).reshape(-1)

    @torch.no_grad()
    def posterior(self) -> Posterior:
        """The exact posterior at the current hyperparameters (cached until they change).

        Gaussian likelihoods: the GP posterior. Others: the Laplace posterior, centred at the
        MAP, with covariance :math:`J_*(J^\top\\Lambda J + P_0)^{-1}J_*^\top`.
        """
        delta = self.prior_precision.detach().clone()
        key = (delta,) if self.is_laplace else (delta, self._noise().detach().clone())
        if self._posterior is not None:
            old, post = self._posterior
            if all(torch.equal(a, b) for a, b in zip(old, key)):
                return post
        if self.is_laplace:
            post = self.solver.laplace_posterior(delta)
        else:
            post = self.solver.posterior(delta, key[1], self._residual())
        self._posterior = (key, post)
        return post

    def log_evidence(self) -> Tensor:
        r"""The log marginal likelihood, differentiable in the hyperparameters.

        Gaussian likelihoods: the exact :math:`\log p(y \mid \delta, \sigma)`, equal to
        ``ExactMarginalLogLikelihood(likelihood, model)(model(train_x), train_y) * N * C``.
        Others: the Laplace evidence
        :math:`\log p(y\mid\hat f) - \tfrac12\hat\theta^\top P_0\hat\theta - \tfrac12\log|I + B^\top K B|`.
        """
        delta = self.prior_precision
        if self.is_laplace:
            theta = self.network.flat_params.to(torch.float64)
            prior = self.covar_module.groups.expand(delta.to(torch.float64), self.network.numels)
            scatter = (prior * theta.square()).sum()
            evidence = self.map_log_likelihood - 0.5 * scatter - 0.5 * self.solver.log_det(delta)
            return evidence + self.solver.correction(delta, None)
        noise = self._noise()
        inv_quad, log_det = self.solver.inv_quad_logdet(delta, noise, self._residual().unsqueeze(-1), True)
        evidence = -0.5 * (inv_quad.sum() + log_det + self.solver.size * math.log(2 * math.pi))
        return evidence + self.solver.correction(delta, noise)
