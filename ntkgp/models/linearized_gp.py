r"""A trained network, linearized, as an exact GPyTorch GP."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import gpytorch
import torch
from gpytorch.constraints import Interval
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.likelihoods import Likelihood, MultitaskGaussianLikelihood
from gpytorch.models import GP, ExactGP
from linear_operator.operators import DiagLinearOperator, LinearOperator, ZeroLinearOperator
from torch import Tensor, nn

from ntkgp._references import drop_self_references
from ntkgp._validation import check_likelihood, check_module_device, check_targets
from ntkgp.distributed import Sharding
from ntkgp.kernels.ntk_kernel import NTKKernel
from ntkgp.likelihoods.base import LaplaceLikelihood
from ntkgp.means.linearized_mean import LinearizedMean
from ntkgp.models.batched import batched_distribution, split_batch
from ntkgp.models.conditioning import ConditioningMixin
from ntkgp.models.guards import CorrectionTerm, FixedDataMixin
from ntkgp.models.laplace_mode import LaplaceModeMixin
from ntkgp.models.loader import collect_batches
from ntkgp.models.sharded import SHARDED_TRAIN_CALL, make_sharding, noise_of_shard
from ntkgp.models.training_distribution import TrainingMultitaskMultivariateNormal, TrainingMultivariateNormal
from ntkgp.network.functional import FunctionalNetwork, OutputFn
from ntkgp.network.inputs import InputLike, Inputs
from ntkgp.network.passes import outside_inference_mode
from ntkgp.network.subnetwork import SubnetworkSpec
from ntkgp.ntk import EmpiricalNTK, Implementation, NTKProblem, PriorLayout, PriorPrecisionSpec, outputs
from ntkgp.operators.posterior_covariance import PosteriorCovariance
from ntkgp.operators.training_covariance import TrainingCovariance
from ntkgp.posteriors.base import Posterior
from ntkgp.solvers.base import GaussianSolver, LaplaceSolver, SolverSpec
from ntkgp.solvers.mode import LinearizedMode
from ntkgp.solvers.select import ExactSolverName, choose_space, make_laplace_solver, make_solver

__all__ = ["LinearizedGP"]


class LinearizedGP(ConditioningMixin, LaplaceModeMixin, FixedDataMixin, ExactGP):
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
    :math:`J^\top J`) is computed once, on first use.

    Parameters
    ----------
    net:
        The trained network. Put BatchNorm/Dropout networks in eval mode first. It is read, never
        written: ntkgp evaluates a private copy with a snapshot of its parameters and buffers, so
        changing the network later does not change the GP.
    likelihood:
        Regression (exact GP): ``GaussianLikelihood`` or ``FixedNoiseGaussianLikelihood``
        (``C = 1``), or ``MultitaskGaussianLikelihood(num_tasks=C)`` with ``rank=0``.
        Classification and heteroscedastic regression (the Laplace GP at the MAP, with the
        per-point GGN blocks :math:`\Lambda_n`): ``ntkgp.likelihoods.SoftmaxLikelihood``,
        ``BernoulliLikelihood`` or ``NaturalGaussianLikelihood``; fit their prior precisions
        with ``ntkgp.mlls.LaplaceMarginalLogLikelihood``.
    train_x:
        Training inputs in the form the network takes (:class:`~ntkgp.network.Inputs`): a tensor
        ``(N, ...)`` of any dtype (token ids included), a tuple of tensors (``net(*x)``) or a dict
        of tensors (``net(**x)``), all with leading dimension N, on the network's device.
    train_y:
        Targets ``(N,)`` for ``C = 1`` or ``(N, C)``; integer labels ``(N,)`` for softmax.
    prior_precision:
        :math:`\delta`: a number, one value per parameter tensor, ``{module name: value}``, or a
        structure: ``"scalar"``, ``"tensor"`` or ``"module"`` (:mod:`ntkgp.ntk.layout`).
    prior_precision_constraint:
        Positivity constraint of :math:`\delta` (default ``gpytorch.constraints.Positive()``,
        softplus). ``Positive(transform=torch.exp, inv_transform=torch.log)`` makes the raw
        parameter :math:`\log\delta`, so optimizer steps are relative (see ``docs/marglik.md``).
    solver:
        Exact: ``"auto"`` (weight space if ``P < N C``, else kernel space), ``"kernel"`` or
        ``"weight"``. Approximate, for large N (``docs/solvers.md``): a
        :class:`~ntkgp.solvers.SolverSpec` such as ``ntkgp.solvers.Inducing(num_inducing=500)``.
    subnetwork:
        Which parameters are Bayesian (:mod:`ntkgp.network.subnetwork`): ``None`` (every
        parameter with ``requires_grad=True``), ``"last_layer"``, a list of module or parameter
        names, or a callable ``(name, param) -> bool``. The others are held at their values.
    output_fn:
        Maps the network's return value to the ``(n, C)`` or ``(n,)`` outputs to linearize, e.g.
        ``lambda out: out.logits``.
    implementation:
        ``"structured"`` (default: structured routes where a parameter qualifies,
        :mod:`ntkgp.structured`) or ``"generic"`` (per-example Jacobians throughout).
    chunk_size:
        Examples per chunk in passes over data (default: about 2**25 Jacobian entries).
    memory_budget:
        Bytes for Jacobian blocks (default: a quarter of free memory, at most 4 GiB).
    progress:
        Show tqdm progress bars on long passes.
    mode:
        Laplace likelihoods: ``"map"`` (default: the Laplace approximation at :math:`\hat\theta` for every
        :math:`\delta`, predictive mean = the network), ``"linearized"`` (at the linearized model's posterior
        mode for the current :math:`\delta`, :mod:`ntkgp.solvers.mode`) or ``"auto"``: ``"linearized"`` where
        the network is not at a MAP of the stated prior. ``"map"`` is the default because it predicted better
        on every network measured, at 1/13-1/21 of the time (``docs/calibration.md``). Approximate solvers use
        ``"map"``.
    process_group:
        ``None`` (one process), or a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``) over
        which the training data are sharded: each rank passes its own shard as ``train_x``, ``train_y``
        and the same network, prior and likelihood; every rank gets the same evidence, gradients and
        posterior (``docs/distributed.md``). Building the GP, its solver, ``log_evidence()``, its backward
        pass and ``posterior()`` are then collective: call them on every rank. Sharded routes: the exact
        weight-space solver, ``Inducing``, ``ConjugateGradients`` and ``SubsetOfData``.
    """

    @outside_inference_mode
    def __init__(
        self,
        net: nn.Module,
        likelihood: Likelihood,
        train_x: InputLike,
        train_y: Tensor,
        prior_precision: PriorPrecisionSpec = 1.0,
        *,
        prior_precision_constraint: Interval | None = None,
        solver: ExactSolverName | SolverSpec = "auto",
        subnetwork: SubnetworkSpec = None,
        output_fn: OutputFn | None = None,
        implementation: Implementation | str = Implementation.STRUCTURED,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        progress: bool = False,
        mode: str = "map",
        process_group: Any = None,
    ) -> None:
        if mode not in ("auto", "map", "linearized"):
            raise ValueError(f"mode must be 'auto', 'map' or 'linearized', got {mode!r}")
        x = Inputs.wrap(train_x, "train_x")
        x.check("train_x")
        shape = x.data.shape[1:] if x.form == "tensor" else None
        network = FunctionalNetwork(
            net,
            shape,
            chunk_size=chunk_size,
            progress=progress,
            subnetwork=subnetwork,
            output_fn=output_fn,
            probe_inputs=x[:3],
        )
        x.check("train_x", device=network.device)
        if x.float_dtype is not None and x.float_dtype not in (network.dtype, network.source_dtype):
            raise TypeError(
                f"train_x has dtype {x.float_dtype} but the network's parameters are {network.source_dtype}"
            )
        if not isinstance(solver, SolverSpec) and solver not in ("auto", "kernel", "weight"):
            raise ValueError(f"solver must be 'auto', 'kernel', 'weight' or a SolverSpec, got {solver!r}")
        check_module_device(likelihood, "likelihood", network.device)
        if isinstance(likelihood, LaplaceLikelihood):
            if likelihood.num_outputs != network.num_outputs:
                raise ValueError(
                    f"the network has {network.num_outputs} outputs but {type(likelihood).__name__} "
                    f"expects {likelihood.num_outputs}"
                )
            train_y = likelihood.check_targets(train_y, x.num)
            Inputs.wrap(train_y.to(torch.float64), "train_y").check("train_y", device=network.device)
        else:
            check_likelihood(likelihood, network.num_outputs, x.num)
            train_y = check_targets(train_y, x.num, network.num_outputs, network.device)
        # ExactGP.__init__ without its Gaussian-only check: the Laplace likelihoods are handled here.
        GP.__init__(self)
        self.train_inputs = (x.flat(),) if x.form == "tensor" else tuple(t for _, t in x.tensors())
        self.train_targets, self.likelihood, self.prediction_strategy = train_y, likelihood, None
        self.covar_module = NTKKernel(
            network,
            prior_precision,
            prior_precision_constraint=prior_precision_constraint,
            memory_budget=memory_budget,
            implementation=implementation,
            probe_inputs=x[:3],
        )
        self.mean_module = LinearizedMean(self.covar_module.ntk)
        sharding = make_sharding(process_group, x.num, network, self.covar_module.layout, likelihood)
        #: the training problem the solver is built on (the NTK, the training inputs and their sharding)
        self.problem = NTKProblem(self.covar_module.ntk, x, sharding)
        self._solver_choice = solver
        self._train_mean_cache: Tensor | None = None  # m(X), computed on first use (one jvp pass)
        self._hessian_root: Tensor | None = None
        if isinstance(likelihood, LaplaceLikelihood):
            f_hat = outputs(self.problem.ntk, x).to(torch.float64)  # the captures kept when they serve
            likelihood.check_outputs(f_hat)
            #: :math:`\log p(y \mid \hat f)` at the MAP (summed over ranks)
            self.map_log_likelihood = sharding.sum(likelihood.log_likelihood(f_hat, train_y))
            self._hessian_root = likelihood.hessian_root(f_hat)
        if not isinstance(solver, SolverSpec) and not (sharding.distributed and solver == "auto"):
            # checked now; a sharded "auto" only when the solver is built (the subset bound never builds it)
            varies = not isinstance(likelihood, LaplaceLikelihood) and self._noise_varies_over_data()
            choose_space(self.problem, solver, noise_varies_over_data=varies)
        self._solver: GaussianSolver | LaplaceSolver | None = None
        if isinstance(solver, SolverSpec):
            self.register_added_loss_term("approximation_correction")
        self._posterior: tuple[tuple[Tensor, ...], Posterior] | None = None
        #: the likelihood's state (:meth:`_likelihood_state`) when the cached posterior was last checked
        self._posterior_state: tuple[Any, ...] | None = None
        self._mode_choice = mode
        self._mode_finder: LinearizedMode | None = None
        self._linearized: bool | None = None
        # freed as soon as the last reference goes, not at the next garbage collection
        drop_self_references(self)

    def _noise_varies_over_data(self) -> bool:
        """Whether the likelihood's noise differs between data points (per-point fixed noise)."""
        with torch.no_grad():
            per_point = self.noise_diagonal().reshape(-1, self.num_outputs)
        varies = not torch.equal(per_point, per_point[:1].expand_as(per_point))
        sharding = self.problem.sharding
        if sharding.distributed:  # over every rank: each rank's own first row, against rank 0's
            first = sharding.broadcast_(per_point[0].clone())
            varies = sharding.any(varies or not torch.equal(per_point[0], first), self.network.device)
        return varies

    @classmethod
    def from_loader(cls, net: nn.Module, likelihood: Likelihood, loader: Iterable[Any], **kwargs: Any) -> LinearizedGP:
        """The GP of ``net`` on the ``(x, y)`` batches of a ``DataLoader`` (or any iterable), read once
        (:mod:`ntkgp.models.loader`); ``kwargs`` as for the constructor."""
        x, y = collect_batches(loader, progress=kwargs.get("progress", False))
        return cls(net, likelihood, x, y, **kwargs)

    # ------------------------------------------------------------ properties
    @property
    def network(self) -> FunctionalNetwork:
        """The linearized network (a read-only view of ``net`` at :math:`\\hat\\theta`)."""
        return self.covar_module.network

    @property
    def ntk(self) -> EmpiricalNTK:
        """The products engine of the NTK (network, prior layout, budget, routes)."""
        return self.covar_module.ntk

    @property
    def layout(self) -> PriorLayout:
        """The prior groups over the network's parameter tensors."""
        return self.covar_module.layout

    @property
    def train_x(self) -> Inputs:
        """The training inputs, in the form the network takes them."""
        return self.problem.x

    @property
    @outside_inference_mode
    def solver(self) -> GaussianSolver | LaplaceSolver:
        """The solver, built on first use: it caches what does not depend on the hyperparameters
        (Gram matrices or :math:`J^\\top J` of the training data for the exact solvers; the memory
        check, and a :class:`~ntkgp.KernelTooLargeError`, happen then)."""
        if self._solver is None:
            choice, root = self._solver_choice, self._hessian_root
            if root is not None:
                self._solver = (
                    choice.laplace(self.problem, root)
                    if isinstance(choice, SolverSpec)
                    else make_laplace_solver(self.problem, choice, root)
                )
            elif isinstance(choice, SolverSpec):
                self._solver = choice.gaussian(self.problem)
            else:
                self._solver = make_solver(self.problem, choice, noise_varies_over_data=self._noise_varies_over_data())
        return self._solver

    @property
    @outside_inference_mode
    def train_mean(self) -> Tensor:
        r"""The prior mean at the training inputs, :math:`m(X) = f(X) - J(X)\hat\theta`, float64.

        Computed on first use: the subset bound and the Laplace evidence never need it."""
        if self._train_mean_cache is None:
            self._train_mean_cache = self.mean_module(self.train_x).to(torch.float64)
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
        """N, the number of training points (with a process group: this rank's; see :attr:`total_data`)."""
        return self.train_x.num

    @property
    def total_data(self) -> int:
        """N over every rank of the process group (:attr:`num_data` for one process)."""
        return self.problem.total_data

    @property
    def sharding(self) -> Sharding:
        """How the training data are split over processes (:mod:`ntkgp.distributed`)."""
        return self.problem.sharding

    @property
    def is_laplace(self) -> bool:
        """Whether the likelihood is non-Gaussian (Laplace approximation at the MAP)."""
        return isinstance(self.likelihood, LaplaceLikelihood)

    # ---------------------------------------------------------- distributions
    def inputs(self, x: InputLike) -> Inputs:
        """``x`` as :class:`Inputs` of the training inputs' form, checked (shapes, finite floats, device)."""
        inputs = self.network.inputs(x)
        problem = self.train_x.same_structure(inputs)
        if problem is not None:
            raise ValueError(f"the GP was built on {self.train_x} and got {inputs}: {problem}")
        inputs.check("x", device=self.network.device)
        return inputs

    def _distribution(self, mean: Tensor, covar: LinearOperator, *, training: bool = False) -> MultivariateNormal:
        single, multi = (
            (TrainingMultivariateNormal, TrainingMultitaskMultivariateNormal)
            if training
            else (MultivariateNormal, MultitaskMultivariateNormal)
        )
        if self.num_outputs == 1:
            return single(mean.reshape(-1), covar)
        return multi(mean.reshape(-1, self.num_outputs), covar, interleaved=True)

    def forward(self, x: InputLike) -> MultivariateNormal:
        """The GP prior at ``x`` with the lazy NTK operator (no solves)."""
        inputs = self.inputs(x)
        return self._distribution(self.mean_module(inputs), self.covar_module.operator(inputs, inputs))

    @outside_inference_mode
    def __call__(self, *args: Any, **kwargs: Any) -> MultivariateNormal:
        batched = split_batch(self.train_x, args[0])  # (*batch, q, ...) inputs: joint over each q
        if batched is not None:
            if self.training and not gpytorch.settings.prior_mode.on():
                raise RuntimeError("batched inputs (*batch, q, ...) are for predictions: call model.eval() first")
            return batched_distribution(self, batched, prior=gpytorch.settings.prior_mode.on())
        x = self.inputs(args[0])
        if gpytorch.settings.prior_mode.on():
            return self.forward(x)
        if self.training:
            if self.problem.sharding.distributed:
                raise RuntimeError(SHARDED_TRAIN_CALL)
            if not x.equal(self.train_x):
                raise RuntimeError(
                    "in train mode LinearizedGP must be called on its training inputs "
                    "(call model.eval() to predict elsewhere)"
                )
            if self.is_laplace:  # the prior at the training inputs; the evidence is log_evidence()
                return self._distribution(self.train_mean, self.covar_module.operator(self.train_x, self.train_x))
            if not self.solver.exact:
                delta = self.prior_precision
                self.update_added_loss_term(
                    "approximation_correction",
                    CorrectionTerm(lambda: self.solver.correction(delta, self.noise_diagonal())),
                )
            solver = self.solver
            assert isinstance(solver, GaussianSolver)
            zeros = torch.zeros(solver.size, dtype=torch.float64, device=self.network.device)
            covariance = TrainingCovariance(self.prior_precision, zeros, solver=solver)
            return self._distribution(self.train_mean, covariance, training=True)
        posterior = self.posterior()
        return self._distribution(posterior.mean(x), PosteriorCovariance(x=x, posterior=posterior))

    # ------------------------------------------------------------- posterior
    def noise_diagonal(self) -> Tensor:
        """The likelihood's noise on the training data, ``(N*C,)``, float64, differentiable in its parameters
        (with a process group: this rank's rows, the parameters' gradients summed over ranks)."""
        if self.problem.sharding.distributed:
            return noise_of_shard(self.problem.sharding, self.likelihood, self._noise_diagonal)
        return self._noise_diagonal()

    def _noise_diagonal(self) -> Tensor:
        m = self.num_data * self.num_outputs
        zero = ZeroLinearOperator(m, m, dtype=torch.float64, device=self.network.device)
        mean = torch.zeros(m, dtype=torch.float64, device=self.network.device)  # the noise does not depend on it
        noise = self.likelihood(self._distribution(mean, zero)).lazy_covariance_matrix
        if not isinstance(noise, DiagLinearOperator):
            raise NotImplementedError(f"the likelihood's noise must be diagonal, got {type(noise).__name__}")
        return noise.diagonal().to(torch.float64).expand(m)

    def residual(self) -> Tensor:
        """Training targets minus the prior mean, ``(N*C,)``, float64."""
        return (self.train_targets.to(torch.float64) - self.train_mean).reshape(-1)

    @outside_inference_mode
    @torch.no_grad()
    def posterior(self) -> Posterior:
        """The posterior at the current hyperparameters (cached until they change).

        Gaussian likelihoods: the GP posterior. Others: the Laplace posterior, centred at the
        MAP, with covariance :math:`J_*(J^\\top\\Lambda J + P_0)^{-1}J_*^\\top`.
        """
        delta = self.prior_precision.detach().clone()
        state = self._likelihood_state()
        if (
            self._posterior is not None
            and _same(state, self._posterior_state)
            and torch.equal(self._posterior[0][0], delta)
        ):
            return self._posterior[1]  # the likelihood's tensors are unchanged: so is its noise
        noise = None if self.is_laplace else self.noise_diagonal().detach().clone()
        key = (delta,) if noise is None else (delta, noise)
        if self._posterior is not None:
            old, post = self._posterior
            if _same(old, key):
                self._posterior_state = state
                return post
        finder = self.mode_finder
        if finder is not None:
            post = finder.posterior(delta)
        else:
            solver = self.solver
            if isinstance(solver, LaplaceSolver):
                post = solver.laplace_posterior(delta)
            else:
                assert noise is not None
                post = solver.posterior(delta, noise, self.residual())
        self._posterior, self._posterior_state = (key, post), state
        return post

    def _likelihood_state(self) -> tuple[Any, ...] | None:
        """For likelihoods whose noise is a function of their parameters and buffers alone (Gaussian and
        multitask Gaussian, exactly): the likelihood's identity and copies of those; else ``None`` (a
        ``FixedNoiseGaussianLikelihood`` holds its noise in a plain attribute)."""
        if type(self.likelihood) not in (gpytorch.likelihoods.GaussianLikelihood, MultitaskGaussianLikelihood):
            return None
        tensors = [*self.likelihood.parameters(), *self.likelihood.buffers()]
        return (id(self.likelihood), *(t.detach().clone() for t in tensors))

    @outside_inference_mode
    def log_evidence(self) -> Tensor:
        r"""The log marginal likelihood, differentiable in the hyperparameters.

        Gaussian likelihoods: the exact :math:`\log p(y \mid \delta, \sigma)`, equal to
        ``ExactMarginalLogLikelihood(likelihood, model)(model(train_x), train_y) * N * C``.
        Others: the Laplace evidence
        :math:`\log p(y\mid\hat f) - \tfrac12\hat\theta^\top P_0\hat\theta - \tfrac12\log|I + B^\top K B|`.
        """
        delta = self.prior_precision
        finder = self.mode_finder
        if finder is not None:
            return finder.log_evidence(delta)
        # Gaussian: the prior mean first, whose capture pass over the training inputs may be kept (a last layer,
        # an MLP) for the solver's build to reuse
        residual = None if isinstance(self.likelihood, LaplaceLikelihood) else self.residual()
        solver = self.solver
        if isinstance(solver, LaplaceSolver):
            theta = self.network.flat_params.to(torch.float64)
            scatter = (self.layout.expand(delta.to(torch.float64)) * theta.square()).sum()
            evidence = self.map_log_likelihood - 0.5 * scatter - 0.5 * solver.log_det(delta)
            return evidence + solver.correction(delta, None)
        noise = self.noise_diagonal()
        assert residual is not None
        inv_quad, log_det = solver.inv_quad_logdet(delta, noise, residual.unsqueeze(-1), True)
        evidence = -0.5 * (inv_quad.sum() + log_det + self.problem.total_size * math.log(2 * math.pi))
        return evidence + solver.correction(delta, noise)


def _same(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    """Whether two keys (tensors, or other values compared by ``==``) are equal, entry by entry."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(torch.equal(u, v) if isinstance(u, Tensor) and isinstance(v, Tensor) else u == v for u, v in zip(a, b))
