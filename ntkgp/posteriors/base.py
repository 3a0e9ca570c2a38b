r"""The GP posterior at fixed hyperparameters: the interface every solver's posterior implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ntkgp.network.functional import FunctionalNetwork
from ntkgp.network.inputs import InputLike, Inputs
from ntkgp.ntk import EmpiricalNTK, outputs, outputs_and_pushforward

__all__ = ["Posterior"]


class Posterior(ABC):
    r"""The GP posterior on a fixed set of hyperparameters.

    Its mean is :math:`\mu(x_*) = f(x_*;\hat\theta) + J(x_*)(\bar\theta - \hat\theta)`, where
    :math:`\bar\theta` (``weights``) is the posterior mean of the linearized model's weights. The
    training-side quantities (factors, weights) carry no gradients; predictions at test inputs that
    require grad are differentiable in them.

    Parameters
    ----------
    ntk:
        The products engine.
    weights:
        :math:`\bar\theta`, ``(P,)``, float64.
    """

    def __init__(self, ntk: EmpiricalNTK, weights: Tensor) -> None:
        self.ntk = ntk
        #: posterior mean weights, ``(P,)``, float64
        self.weights = weights

    @property
    def network(self) -> FunctionalNetwork:
        return self.ntk.network

    def mean(self, x: InputLike) -> Tensor:
        """Predictive mean, ``(N*, C)``, float64 (a plain MLP's from one closed-form capture pass, whose captures
        the covariance at the same inputs then reuses)."""
        x = self.network.inputs(x)
        shift = (self.weights - self.network.flat_params.to(torch.float64)).unsqueeze(0)
        if not shift.any():  # the Laplace posterior is centred at the MAP: the mean is f(x)
            return outputs(self.ntk, x).to(torch.float64)  # captures kept for the covariance when they serve
        f, pushed = outputs_and_pushforward(self.ntk, x, shift)
        return f.to(torch.float64) + pushed[0].to(torch.float64)

    def rows_per_block(self, cols: int) -> int:
        """Test points per block so that a ``(block * C) x cols`` float64 matrix fits the budget."""
        return max(1, self.ntk.budget // (8 * 4 * self.ntk.num_outputs * max(cols, 1)))

    def covariance_blocks(self, x: InputLike) -> Tensor:
        """Per-point ``C x C`` blocks of the predictive covariance, ``(N*, C, C)``, float64; memory
        linear in the number of test points."""
        return self._covariance_blocks(self.network.inputs(x))

    def covariance(self, x: InputLike) -> Tensor:
        """Dense predictive covariance of the latent function, ``(N*C, N*C)``, float64."""
        return self._covariance(self.network.inputs(x))

    def covariance_diagonal(self, x: InputLike) -> Tensor:
        """Predictive variances, ``(N*C,)``, float64, chunked over test points."""
        return self.covariance_blocks(x).diagonal(dim1=-2, dim2=-1).reshape(-1)

    def covariance_matmul(self, x: InputLike, rhs: Tensor) -> Tensor:
        """Predictive covariance times ``rhs`` ``(N*C, t)``, lazily."""
        return self._covariance_matmul(self.network.inputs(x), rhs)

    @abstractmethod
    def _covariance_blocks(self, x: Inputs) -> Tensor: ...

    @abstractmethod
    def _covariance(self, x: Inputs) -> Tensor: ...

    @abstractmethod
    def _covariance_matmul(self, x: Inputs, rhs: Tensor) -> Tensor: ...
