r"""The Laplace marginal likelihood of a LinearizedGP, as a GPyTorch MLL."""

from __future__ import annotations

from typing import Any

import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.likelihoods import Likelihood
from gpytorch.mlls import MarginalLogLikelihood
from torch import Tensor

__all__ = ["LaplaceMarginalLogLikelihood"]


class LaplaceMarginalLogLikelihood(MarginalLogLikelihood):
    r"""``mll(model(train_x), train_y)`` = (log evidence) / N, differentiable in the hyperparameters.

    For a non-Gaussian likelihood the log evidence is the Laplace approximation at the MAP,

    .. math::
        \log p(y \mid \hat f) - \tfrac12 \hat\theta^\top P_0 \hat\theta - \tfrac12 \log|I + B^\top K B|,

    equal to the weight-space GGN Laplace evidence; for a Gaussian likelihood it is the exact
    evidence (then equal to ``ExactMarginalLogLikelihood`` times ``C``). Like GPyTorch's MLLs it
    is divided by the number of training points N (of every rank, with a process group). It is
    defined on the model's own training targets, which must be passed.
    """

    def __init__(self, likelihood: Likelihood, model: Any) -> None:
        from ntkgp.models.linearized_gp import LinearizedGP

        if not isinstance(model, LinearizedGP):
            raise TypeError(f"LaplaceMarginalLogLikelihood needs a LinearizedGP, got {type(model).__name__}")
        if likelihood is not model.likelihood:
            raise ValueError("the likelihood must be the model's own likelihood")
        super().__init__(likelihood, model)

    def forward(self, function_dist: MultivariateNormal, target: Tensor, *params: Any, **kwargs: Any) -> Tensor:
        train_y = self.model.train_targets
        if target.shape != train_y.shape or not torch.equal(target.to(train_y.dtype), train_y):
            raise ValueError("the Laplace evidence is defined on the model's training targets; pass train_y")
        return self.model.log_evidence() / self.model.total_data
