r"""Bernoulli likelihood on one logit, for binary classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli

from ntkgp.likelihoods.base import LaplaceLikelihood
from ntkgp.likelihoods.link import check_link, expected_sigmoid

__all__ = ["BernoulliLikelihood"]


class BernoulliLikelihood(LaplaceLikelihood):
    r""":math:`p(y = 1 \mid f) = \sigma(f)` for one logit; :math:`\Lambda_n = p_n(1 - p_n)`.

    Parameters
    ----------
    link_approx:
        ``"probit"`` (default) or ``"mc"``.
    n_samples, generator:
        Samples and random generator for ``"mc"`` (default: a generator seeded with ``0`` on every
        call, so predictions are reproducible and the global RNG is never used).
    """

    num_outputs = 1

    def __init__(
        self, *, link_approx: str = "probit", n_samples: int = 1000, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.link_approx = check_link(link_approx, ("probit", "mc"))
        self.n_samples, self.generator = n_samples, generator

    def check_targets(self, y: Tensor, num_data: int) -> Tensor:
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if tuple(y.shape) != (num_data,):
            raise ValueError(f"train_y must have shape ({num_data},) of 0/1 targets, got {tuple(y.shape)}")
        if not ((y == 0) | (y == 1)).all():
            bad = y[(y != 0) & (y != 1)]
            raise ValueError(f"BernoulliLikelihood targets must be 0 or 1; found {bad[:5].tolist()}")
        return y.to(torch.float64)

    def log_likelihood(self, f: Tensor, y: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(f[:, 0], y.to(f.dtype), reduction="sum")

    def hessian_root(self, f: Tensor) -> Tensor:
        p = torch.sigmoid(f)
        return (p * (1 - p)).sqrt().unsqueeze(-1)

    def predictive(self, mean: Tensor, covariance: Tensor) -> Bernoulli:
        probs = expected_sigmoid(
            mean[:, 0], covariance[:, 0, 0], self.link_approx, n_samples=self.n_samples, generator=self.generator
        )
        return Bernoulli(probs=probs)
