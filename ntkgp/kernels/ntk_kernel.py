r"""The empirical neural tangent kernel as a GPyTorch kernel."""

from __future__ import annotations

from typing import Any

import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.kernels import Kernel
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from ntkgp.functional import FunctionalNetwork
from ntkgp.memory import default_budget
from ntkgp.operators.ntk_linear_operator import NTKLinearOperator
from ntkgp.parameter_groups import PriorPrecisionSpec, parameter_groups

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
    (``NTKKernel(net, input_shape=(D,)) + ScaleKernel(RBFKernel())``).

    Parameters
    ----------
    network:
        The trained ``nn.Module`` (with ``input_shape``) or a ready
        :class:`~ntkgp.functional.FunctionalNetwork`. Its weights are *not* GP
        hyperparameters and are never in ``kernel.parameters()``.
    prior_precision:
        :math:`\delta`: a number, one value per parameter tensor, or a mapping from module
        name to value (see :mod:`ntkgp.parameter_groups`). Each :math:`\delta_g` is a
        positive hyperparameter, ``raw_prior_precision`` of shape ``(G,)``.
    input_shape:
        Shape of one example when ``network`` is an ``nn.Module``. Inputs to the kernel are
        flattened ``(N, D)``, reshaped to ``(N, *input_shape)`` for the network.
    prior_precision_constraint:
        Constraint on :math:`\delta` (default :class:`gpytorch.constraints.Positive`).
    memory_budget:
        Bytes for Jacobian blocks in dense contractions (default: a quarter of free
        memory, at most 4 GiB).
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(network, FunctionalNetwork):
            if input_shape is None:
                raise ValueError("input_shape is required when network is an nn.Module")
            network = FunctionalNetwork(network, input_shape)
        # A plain attribute, not a submodule: the network's weights are not hyperparameters.
        self.network = network
        self.groups = parameter_groups(network.names, prior_precision)
        self.memory_budget = default_budget(network.device) if memory_budget is None else memory_budget
        constraint = Positive() if prior_precision_constraint is None else prior_precision_constraint
        self.register_parameter(
            "raw_prior_precision",
            nn.Parameter(torch.zeros(self.groups.num_groups, dtype=torch.float64, device=network.device)),
        )
        self.register_constraint("raw_prior_precision", constraint)
        self.prior_precision = self.groups.initial_precision.to(network.device)

    @property
    def prior_precision(self) -> Tensor:
        r""":math:`\delta`, shape ``(G,)``, one per parameter group."""
        return self.raw_prior_precision_constraint.transform(self.raw_prior_precision)

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.raw_prior_precision.dtype, device=self.raw_prior_precision.device)
        value = value.expand(self.groups.num_groups)
        if not torch.isfinite(value).all() or (value <= 0).any():
            raise ValueError(f"prior_precision must be positive and finite, got {value.tolist()}")
        self.initialize(raw_prior_precision=self.raw_prior_precision_constraint.inverse_transform(value))

    @property
    def group_names(self) -> tuple[str, ...]:
        """Names of the prior groups, aligned with :attr:`prior_precision`."""
        return self.groups.names

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return self.network.num_outputs

    def _check_inputs(self, x: Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(
                f"NTKKernel takes flattened inputs of shape (N, D); got {tuple(x.shape)} "
                "(batched kernels are not supported)"
            )
        expected = self.network.input_shape.numel()
        if x.shape[-1] != expected:
            raise ValueError(
                f"NTKKernel inputs have {x.shape[-1]} features but the network takes examples "
                f"of shape {tuple(self.network.input_shape)} ({expected} features)"
            )

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> LinearOperator | Tensor:
        if last_dim_is_batch:
            raise NotImplementedError("NTKKernel does not support last_dim_is_batch")
        self._check_inputs(x1)
        self._check_inputs(x2)
        op = NTKLinearOperator(
            x1, x2, self.prior_precision,
            network=self.network, groups=self.groups, budget=self.memory_budget,
        )
        if diag:
            return op._diagonal()
        return op
