r"""Heteroscedastic Gaussian likelihood in natural parameters, for regression with input-dependent noise."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Normal

from ntkgp.likelihoods.base import LaplaceLikelihood
from ntkgp.likelihoods.link import _gaussian_samples, check_link

__all__ = ["HeteroscedasticNormal", "NaturalGaussianLikelihood"]


class HeteroscedasticNormal(Normal):
    r"""Moment-matched Gaussian predictive of :math:`y`, with its variance split in two.

    ``variance = aleatoric_variance + epistemic_variance``, where aleatoric is
    :math:`\mathbb E_\eta[\sigma^2(\eta)]` (noise the model expects) and epistemic is
    :math:`\mathrm{Var}_\eta[\mu(\eta)]` (uncertainty about the mean), by the law of total variance.
    """

    def __init__(self, mean: Tensor, aleatoric_variance: Tensor, epistemic_variance: Tensor) -> None:
        super().__init__(mean, (aleatoric_variance + epistemic_variance).sqrt())
        self.aleatoric_variance = aleatoric_variance
        self.epistemic_variance = epistemic_variance


class NaturalGaussianLikelihood(LaplaceLikelihood):
    r""":math:`y \sim \mathcal N(\mu, \sigma^2)` with the network outputting natural parameters
    :math:`\eta_1 = \mu/\sigma^2` and :math:`\eta_2 = -1/(2\sigma^2) < 0`.

    In these parameters the log-likelihood
    :math:`\eta_1 y + \eta_2 y^2 + \eta_1^2/(4\eta_2) + \tfrac12\log(-2\eta_2) - \tfrac12\log 2\pi`
    is concave, and its negative Hessian is the covariance of the sufficient statistics
    :math:`(y, y^2)`:

    .. math::
        \Lambda = \begin{pmatrix}\sigma^2 & 2\mu\sigma^2\\ 2\mu\sigma^2 & 4\mu^2\sigma^2 + 2\sigma^4\end{pmatrix}
        = B B^\top,\qquad B = \begin{pmatrix}\sigma & 0\\ 2\mu\sigma & \sqrt2\,\sigma^2\end{pmatrix}.

    Any link that keeps :math:`\eta_2` negative (e.g. ``eta2 = -softplus(h) / 2``) belongs to
    the network.

    Parameters
    ----------
    link_approx:
        How ``likelihood(f)`` forms the predictive moments of :math:`y` from the latent Gaussian
        over :math:`\eta`: ``"delta"`` (default; second-order Taylor expansion for
        :math:`\mathbb E[\mu]` and :math:`\mathbb E[\sigma^2]`, first order for
        :math:`\mathrm{Var}[\mu]`) or ``"mc"`` (Monte Carlo over :math:`\eta`, discarding samples
        with :math:`\eta_2 \ge 0`).
    n_samples, generator:
        Samples and random generator for ``"mc"`` (default: a generator seeded with ``0`` on every
        call, so predictions are reproducible and the global RNG is never used).
    """

    num_outputs = 2

    def __init__(
        self, *, link_approx: str = "delta", n_samples: int = 2000, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.link_approx = check_link(link_approx, ("delta", "mc"))
        self.n_samples, self.generator = n_samples, generator

    @staticmethod
    def moments(eta: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\mu, \sigma^2)` from natural parameters ``(..., 2)``."""
        return -eta[..., 0] / (2 * eta[..., 1]), -1 / (2 * eta[..., 1])

    def check_targets(self, y: Tensor, num_data: int) -> Tensor:
        if not y.is_floating_point():
            y = y.to(torch.float64)
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if tuple(y.shape) != (num_data,):
            raise ValueError(f"train_y must have shape ({num_data},), got {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            raise ValueError("train_y contains NaN or infinite values")
        return y

    def check_outputs(self, f: Tensor) -> None:
        bad = (f[:, 1] >= 0).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"the network's second output (eta2 = -1/(2 sigma^2)) must be negative, but it is >= 0 at "
                f"{bad.numel()} training points (first: {bad[:5].tolist()}); make the network output natural "
                "parameters, e.g. eta2 = -softplus(h) / 2"
            )

    def log_likelihood(self, f: Tensor, y: Tensor) -> Tensor:
        eta1, eta2 = f[:, 0], f[:, 1]
        y = y.to(f.dtype)
        return (
            eta1 * y
            + eta2 * y.square()
            + eta1.square() / (4 * eta2)
            + 0.5 * torch.log(-2 * eta2)
            - 0.5 * math.log(2 * math.pi)
        ).sum()

    def hessian_root(self, f: Tensor) -> Tensor:
        mu, var = self.moments(f)
        sd = var.sqrt()
        b = torch.zeros(*f.shape[:-1], 2, 2, dtype=f.dtype, device=f.device)
        b[..., 0, 0] = sd
        b[..., 1, 0] = 2 * mu * sd
        b[..., 1, 1] = math.sqrt(2) * var
        return b

    def predictive(self, mean: Tensor, covariance: Tensor) -> HeteroscedasticNormal:
        if self.link_approx == "mc":
            samples = _gaussian_samples(mean, covariance, self.n_samples, self.generator)  # shape: (S, N, 2)
            valid = samples[..., 1] < 0
            mu, var = self.moments(torch.where(valid.unsqueeze(-1), samples, mean.expand_as(samples)))
            count = valid.sum(0).clamp_min(1)
            mean_mu = (mu * valid).sum(0) / count
            epistemic = ((mu - mean_mu).square() * valid).sum(0) / count
            aleatoric = (var * valid).sum(0) / count
            return HeteroscedasticNormal(mean_mu, aleatoric, epistemic)
        eta1, eta2 = mean[:, 0], mean[:, 1]
        mu, var = self.moments(mean)
        grad_mu = torch.stack([-1 / (2 * eta2), eta1 / (2 * eta2.square())], -1)  # shape: (N, 2)
        epistemic = torch.einsum("ni,nij,nj->n", grad_mu, covariance, grad_mu)
        # second-order terms: 1/2 tr(Hessian @ Cov) of mu(eta) and of sigma^2(eta) = -1/(2 eta2)
        mean = mu + covariance[:, 0, 1] / (2 * eta2.square()) - eta1 * covariance[:, 1, 1] / (2 * eta2**3)
        aleatoric = var - covariance[:, 1, 1] / (2 * eta2**3)
        return HeteroscedasticNormal(mean, aleatoric, epistemic)
