r"""Approximations of :math:`\mathbb E[\mathrm{softmax}(f)]` and :math:`\mathbb E[\sigma(f)]`
under a Gaussian latent :math:`f \sim \mathcal N(\mu, \Sigma)`.

* ``"probit"``: :math:`\mathrm{softmax}\big(\mu_k / \sqrt{1 + \tfrac{\pi}{8}\Sigma_{kk}}\big)`
  (MacKay's probit approximation, applied per class);
* ``"bridge"``: the Laplace bridge (Hobbhahn, Kristiadi & Hennig, 2022): the Dirichlet with
  :math:`\alpha_k = \Sigma_{kk}^{-1}\big(1 - \tfrac2K + \tfrac{e^{\mu_k}}{K^2}\sum_l e^{-\mu_l}\big)`,
  whose mean :math:`\alpha / \sum_l \alpha_l` is returned. The softmax is unchanged by adding
  a constant to all logits, the bridge is not, so the Gaussian is first projected onto the
  sum-zero subspace, :math:`\mu \to \Pi\mu`, :math:`\Sigma \to \Pi\Sigma\Pi` with
  :math:`\Pi = I - \mathbf 1\mathbf 1^\top / K`;
* ``"mc"``: the average of ``softmax`` over samples of :math:`f`, reproducible with a
  ``torch.Generator``; without one, a generator seeded with ``0`` on every call (the same draws
  each time, and the global RNG untouched).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ntkgp._random import default_generator, draw_device

__all__ = ["LINK_APPROXIMATIONS", "expected_sigmoid", "expected_softmax"]

LINK_APPROXIMATIONS = ("probit", "bridge", "mc")


def check_link(link_approx: str, allowed: tuple[str, ...] = LINK_APPROXIMATIONS) -> str:
    if link_approx not in allowed:
        raise ValueError(f"link_approx must be one of {allowed}, got {link_approx!r}")
    return link_approx


def _gaussian_samples(mean: Tensor, covariance: Tensor, n_samples: int, generator: torch.Generator | None) -> Tensor:
    # shape: mean (N, C), covariance (N, C, C) -> samples (S, N, C)
    generator = default_generator(generator)
    evals, evecs = torch.linalg.eigh(covariance)
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # PSD square root, robust to singular blocks
    noise = torch.randn(
        n_samples, *mean.shape, dtype=mean.dtype, device=draw_device(generator, mean.device), generator=generator
    ).to(mean.device)
    return mean + torch.einsum("nij,snj->sni", root, noise)


def expected_softmax(
    mean: Tensor,
    covariance: Tensor,
    link_approx: str,
    *,
    n_samples: int = 1000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Class probabilities ``(N, C)`` from latent means ``(N, C)`` and covariance blocks ``(N, C, C)``."""
    check_link(link_approx)
    variances = covariance.diagonal(dim1=-2, dim2=-1)
    if link_approx == "probit":
        return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * variances), dim=-1)
    if link_approx == "bridge":
        k = mean.shape[-1]
        centred = mean - mean.mean(-1, keepdim=True)
        projection = torch.eye(k, dtype=covariance.dtype, device=covariance.device) - 1.0 / k
        variances = (projection @ covariance @ projection).diagonal(dim1=-2, dim2=-1)
        alpha = (1 - 2 / k + centred.exp() / k**2 * (-centred).exp().sum(-1, keepdim=True)) / variances
        return alpha / alpha.sum(-1, keepdim=True)
    samples = _gaussian_samples(mean, covariance, n_samples, generator)
    return torch.softmax(samples, dim=-1).mean(0)


def expected_sigmoid(
    mean: Tensor,
    variance: Tensor,
    link_approx: str,
    *,
    n_samples: int = 1000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Probabilities of class 1 ``(N,)`` from latent means and variances ``(N,)``."""
    check_link(link_approx, ("probit", "mc"))
    if link_approx == "probit":
        return torch.sigmoid(mean / torch.sqrt(1 + math.pi / 8 * variance))
    generator = default_generator(generator)
    noise = torch.randn(
        n_samples, *mean.shape, dtype=mean.dtype, device=draw_device(generator, mean.device), generator=generator
    ).to(mean.device)
    return torch.sigmoid(mean + variance.clamp_min(0).sqrt() * noise).mean(0)
