r"""The interface of likelihoods for the linearized-Laplace GP.

A likelihood :math:`p(y \mid f)` on the network's ``C`` outputs supplies what the Laplace
approximation needs at :math:`\hat f = f(X;\hat\theta)`:

* ``log_likelihood(f, y)``: :math:`\sum_n \log p(y_n \mid f_n)`;
* ``hessian_root(f)``: per-point :math:`B_n` ``(C, C)`` with
  :math:`\Lambda_n = -\nabla^2_{f}\log p(y_n\mid f_n) = B_n B_n^\top` (never inverted: the softmax
  :math:`\Lambda_n` is singular);
* ``predictive(mean, covariance)``: the predictive distribution of :math:`y` given the latent
  GP's per-point mean ``(N, C)`` and covariance blocks ``(N, C, C)``.

Calling the likelihood on a latent distribution (``likelihood(model(x))`` in eval mode) returns
``predictive(...)`` with the per-point blocks of that distribution.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.likelihoods import Likelihood
from torch import Tensor
from torch.distributions import Distribution

__all__ = ["LaplaceLikelihood", "point_blocks"]


def point_blocks(dist: MultivariateNormal) -> tuple[Tensor, Tensor]:
    """Per-point means ``(N, C)`` and covariance blocks ``(N, C, C)`` of a latent GP output."""
    if isinstance(dist, MultitaskMultivariateNormal):
        mean = dist.mean
        n, c = mean.shape
        cov = dist.lazy_covariance_matrix
        if hasattr(cov, "point_blocks"):  # ntkgp's posterior covariance: blocks without the full matrix
            return mean, cov.point_blocks()
        if c == 1:
            return mean, cov.diagonal(dim1=-1, dim2=-2).reshape(n, 1, 1)
        dense = cov.to_dense().reshape(n, c, n, c)
        return mean, dense.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    mean = dist.mean.reshape(-1, 1)
    return mean, dist.variance.reshape(-1, 1, 1)


class LaplaceLikelihood(Likelihood):
    """Base class of the non-Gaussian likelihoods of :class:`~ntkgp.models.LinearizedGP`."""

    #: number of network outputs the likelihood expects
    num_outputs: int = 1

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def check_targets(self, y: Tensor, num_data: int) -> Tensor:
        """Validate training targets; return them in the form ``log_likelihood`` takes."""

    def check_outputs(self, f: Tensor) -> None:  # noqa: B027 (optional hook)
        """Validate the network's outputs on the training data (e.g. natural-parameter ranges)."""

    @abstractmethod
    def log_likelihood(self, f: Tensor, y: Tensor) -> Tensor:
        r""":math:`\sum_n \log p(y_n \mid f_n)`, ``f`` of shape ``(N, C)``."""

    @abstractmethod
    def hessian_root(self, f: Tensor) -> Tensor:
        r"""``B`` ``(N, C, C)`` with :math:`B_n B_n^\top = -\nabla_f^2 \log p(y_n \mid f_n)`."""

    @abstractmethod
    def predictive(self, mean: Tensor, covariance: Tensor) -> Distribution:
        """Predictive distribution of ``y`` from per-point latent means and covariance blocks."""

    def forward(self, function_samples: Tensor, *args: Any, **kwargs: Any) -> Distribution:
        raise NotImplementedError(f"{type(self).__name__} is used through LinearizedGP's Laplace approximation")

    def marginal(self, function_dist: MultivariateNormal, *args: Any, **kwargs: Any) -> Distribution:
        mean, cov = point_blocks(function_dist)
        return self.predictive(mean, cov)

    def __call__(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(input, MultivariateNormal):
            return self.marginal(input, *args, **kwargs)
        if torch.is_tensor(input):
            return self.forward(input, *args, **kwargs)
        raise TypeError(f"{type(self).__name__} takes a latent MultivariateNormal, got {type(input).__name__}")
