r"""Categorical likelihood on ``C`` logits, for multi-class classification."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Categorical

from ntkgp.likelihoods.base import LaplaceLikelihood
from ntkgp.likelihoods.link import check_link, expected_softmax

__all__ = ["SoftmaxLikelihood"]


class SoftmaxLikelihood(LaplaceLikelihood):
    r""":math:`p(y = k \mid f) = \mathrm{softmax}(f)_k` for ``C`` logits.

    The negative log-likelihood Hessian is the full block
    :math:`\Lambda_n = \operatorname{diag}(p_n) - p_n p_n^\top` (singular: it annihilates the
    all-ones direction). Its factor is
    :math:`B_n = \operatorname{diag}(\sqrt{p_n}) - p_n\sqrt{p_n}^\top`, since with
    :math:`u = \sqrt{p_n}` a unit vector, :math:`B_n B_n^\top =
    \operatorname{diag}(u)(I - uu^\top)\operatorname{diag}(u) = \Lambda_n`.

    Parameters
    ----------
    num_classes:
        ``C``; the network must output ``C`` logits.
    link_approx:
        ``"probit"`` (default), ``"bridge"`` or ``"mc"``: how ``likelihood(f)`` turns the latent
        Gaussian into class probabilities (see :mod:`ntkgp.likelihoods.link`).
    n_samples, generator:
        Samples and random generator for ``"mc"`` (default: a generator seeded with ``0`` on every
        call, so predictions are reproducible and the global RNG is never used).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        link_approx: str = "probit",
        n_samples: int = 1000,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_outputs = num_classes
        self.link_approx = check_link(link_approx)
        self.n_samples, self.generator = n_samples, generator

    def check_targets(self, y: Tensor, num_data: int) -> Tensor:
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(
                f"SoftmaxLikelihood needs integer class labels; train_y has dtype {y.dtype} "
                "(convert with train_y.long())"
            )
        if tuple(y.shape) != (num_data,):
            raise ValueError(f"train_y must have shape ({num_data},) of class labels, got {tuple(y.shape)}")
        bad = (y < 0) | (y >= self.num_outputs)
        if bad.any():
            raise ValueError(
                f"labels must lie in [0, {self.num_outputs - 1}] for num_classes={self.num_outputs}; "
                f"found {sorted(set(y[bad].tolist()))[:5]}"
            )
        return y.long()

    def log_likelihood(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.log_softmax(f, dim=-1).gather(-1, y.unsqueeze(-1)).sum()

    def hessian_root(self, f: Tensor) -> Tensor:
        p = torch.softmax(f, dim=-1)
        root = p.sqrt()
        return torch.diag_embed(root) - p.unsqueeze(-1) * root.unsqueeze(-2)

    def predictive(self, mean: Tensor, covariance: Tensor) -> Categorical:
        probs = expected_softmax(mean, covariance, self.link_approx, n_samples=self.n_samples, generator=self.generator)
        return Categorical(probs=probs)
