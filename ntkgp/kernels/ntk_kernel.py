r"""The empirical neural tangent kernel as a GPyTorch kernel."""

from __future__ import annotations

from typing import Any

import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.kernels import Kernel
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from ntkgp.memory import default_budget
from ntkgp.network.functional import FunctionalNetwork
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK, Implementation, PriorLayout, PriorPrecisionSpec
from ntkgp.operators.ntk import NTKLinearOperator
from ntkgp.structured.positions import Route

__all__ = ["NTKKernel"]


class NTKKernel(Kernel):
    r"""Empirical NTK of a trained network with per-group prior precisions.

    .. math::
        k\big((x, c), (x', c')\big) = \sum_g \delta_g^{-1}\,
            \frac{\partial f_c(x;\hat\theta)}{\partial \theta_g}
            \frac{\partial f_{c'}(x';\hat\theta)}{\partial \theta_g}^{\!\top}

    This is the prior covariance of the linearized network
    :math:`f_{\text{lin}}(x;\theta) = f(x;\hat\theta) + J(x)(\theta-\hat\theta)` under
    :math:`\theta \sim \mathcal N(0, P_0^{-1})`, :math:`P_0 = \operatorname{diag}(\delta_{g})`.

    For a network with ``C`` outputs the kernel is multi-output: it returns an
    ``(N1*C) x (N2*C)`` matrix in point-major ("interleaved") order, as
    :class:`gpytorch.distributions.MultitaskMultivariateNormal` expects, and keeps the full
    cross-output covariance.

    ``forward`` returns a lazy :class:`~ntkgp.operators.NTKLinearOperator`: matvecs are one
    vjp and one jvp over data chunks; nothing ``N x P`` or ``N x N`` is formed unless asked.
    It composes with other GPyTorch kernels
    (``NTKKernel(net, input_shape=(D,)) + ScaleKernel(RBFKernel())``). As a GPyTorch kernel it takes
    flattened tensor inputs ``(N, D)``; :class:`~ntkgp.LinearizedGP` also takes token ids, tuples
    and dicts (it calls :meth:`operator` directly).

    Parameters
    ----------
    network:
        The trained ``nn.Module`` (with ``input_shape``) or a ready
        :class:`~ntkgp.functional.FunctionalNetwork`. Its weights are *not* GP
        hyperparameters and are never in ``kernel.parameters()``.
    prior_precision:
        :math:`\delta`: a number, one value per parameter tensor, or a mapping from module
        name to value (see :mod:`ntkgp.ntk.layout`). Each :math:`\delta_g` is a
        positive hyperparameter, ``raw_prior_precision`` of shape ``(G,)``.
    input_shape:
        Shape of one example when ``network`` is an ``nn.Module``. Inputs to the kernel are
        flattened ``(N, D)``, reshaped to ``(N, *input_shape)`` for the network.
    prior_precision_constraint:
        Constraint on :math:`\delta` (default :class:`gpytorch.constraints.Positive`).
    memory_budget:
        Bytes for Jacobian blocks in dense contractions (default: a quarter of free
        memory, at most 4 GiB).
    implementation:
        ``"structured"`` (default) or ``"generic"`` (:class:`~ntkgp.ntk.Implementation`).
    conv_route:
        ``"auto"``, ``"gradient"`` or ``"spatial"`` (:mod:`ntkgp.structured.positions`).
    probe_inputs:
        A few example inputs to find the structured routes on (default: the first inputs seen).
    """

    has_lengthscale = False

    def __init__(
        self,
        network: FunctionalNetwork | nn.Module,
        prior_precision: PriorPrecisionSpec = 1.0,
        *,
        input_shape: tuple[int, ...] | None = None,
        prior_precision_constraint: Interval | None = None,
        memory_budget: int | None = None,
        implementation: Implementation | str = Implementation.STRUCTURED,
        conv_route: Route = "auto",
        probe_inputs: Inputs | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(network, FunctionalNetwork):
            if input_shape is None:
                raise ValueError("input_shape is required when network is an nn.Module")
            network = FunctionalNetwork(network, input_shape)
        layout = PriorLayout.from_spec(network.names, network.numels, prior_precision)
        budget = default_budget(network.device) if memory_budget is None else memory_budget
        # A plain attribute, not a submodule: the network's weights are not hyperparameters.
        #: the products engine (network, prior layout, budget, routes)
        self.ntk = EmpiricalNTK(network, layout, budget, Implementation(implementation), conv_route, probe_inputs)
        constraint = Positive() if prior_precision_constraint is None else prior_precision_constraint
        self.register_parameter(
            "raw_prior_precision",
            nn.Parameter(torch.zeros(layout.num_groups, dtype=torch.float64, device=network.device)),
        )
        self.register_constraint("raw_prior_precision", constraint)
        self.prior_precision = layout.initial_precision.to(network.device)

    @property
    def network(self) -> FunctionalNetwork:
        """The linearized network."""
        return self.ntk.network

    @property
    def layout(self) -> PriorLayout:
        """The prior's groups over the network's parameter tensors."""
        return self.ntk.layout

    @property
    def memory_budget(self) -> int:
        """Bytes for Jacobian blocks."""
        return self.ntk.budget

    @property
    def prior_precision(self) -> Tensor:
        r""":math:`\delta`, shape ``(G,)``, one per parameter group."""
        return self.raw_prior_precision_constraint.transform(self.raw_prior_precision)

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.raw_prior_precision.dtype, device=self.raw_prior_precision.device)
        G = self.layout.num_groups
        if value.dim() > 1 or value.numel() not in (1, G):
            raise ValueError(
                f"prior_precision must be one number or {G} values (one per prior group: "
                f"{', '.join(self.layout.group_names)}); got shape {tuple(value.shape)}"
            )
        value = value.reshape(-1).expand(G)
        if not torch.isfinite(value).all() or (value <= 0).any():
            raise ValueError(f"prior_precision must be positive and finite, got {value.tolist()}")
        self.initialize(raw_prior_precision=self.raw_prior_precision_constraint.inverse_transform(value))

    @property
    def group_names(self) -> tuple[str, ...]:
        """Names of the prior groups, aligned with :attr:`prior_precision`."""
        return self.layout.group_names

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return self.network.num_outputs

    def _check_inputs(self, x: Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(
                f"NTKKernel takes flattened inputs of shape (N, D); got {tuple(x.shape)} "
                "(batched kernels are not supported)"
            )
        shape = self.network.input_shape
        if shape is not None and x.shape[-1] != shape.numel():
            raise ValueError(
                f"NTKKernel inputs have {x.shape[-1]} features but the network takes examples "
                f"of shape {tuple(shape)} ({shape.numel()} features)"
            )

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> LinearOperator | Tensor:
        if last_dim_is_batch:
            raise NotImplementedError("NTKKernel does not support last_dim_is_batch")
        self._check_inputs(x1)
        self._check_inputs(x2)
        op = self.operator(self.network.inputs(x1), self.network.inputs(x2))
        return op.diagonal(dim1=-2, dim2=-1) if diag else op

    def operator(self, x1: Inputs, x2: Inputs) -> NTKLinearOperator:
        """The lazy NTK between inputs of any form (the GP's own entry point)."""
        same = x1 is x2 or x1.equal(x2)
        return NTKLinearOperator(self.prior_precision, ntk=self.ntk, x1=x1, x2=x1 if same else x2)
