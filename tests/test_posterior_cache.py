"""The cached posterior of a :class:`~ntkgp.LinearizedGP`: reused while the hyperparameters are unchanged, never after.

``posterior()`` is called on every prediction (each acquisition evaluation of a BO loop); its cache
is checked against the likelihood's tensors first (cheap) and then against the noise itself.
"""

from __future__ import annotations

import gpytorch
import torch
import truth

import ntkgp


def _gp(likelihood: gpytorch.likelihoods.Likelihood) -> ntkgp.LinearizedGP:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, generator=g, dtype=torch.float64)
    return ntkgp.LinearizedGP(truth.mlp(3, 6, 1, seed=1).eval(), likelihood, x, y, solver="kernel").eval()


def test_posterior_is_reused_until_a_hyperparameter_changes() -> None:
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.1
    gp = _gp(likelihood)
    first = gp.posterior()
    assert gp.posterior() is first
    likelihood.noise = 0.2  # written through .data: no version counter moves
    second = gp.posterior()
    assert second is not first
    assert gp.posterior() is second
    gp.prior_precision = 3.0
    third = gp.posterior()
    assert third is not second
    with torch.no_grad():
        likelihood.raw_noise.add_(0.0)  # a write that leaves the values: the posterior is still valid
    assert gp.posterior() is third


def test_fixed_noise_change_is_seen() -> None:
    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=torch.full((10,), 0.1, dtype=torch.float64))
    gp = _gp(likelihood)
    first = gp.posterior()
    likelihood.noise = torch.full((10,), 0.3, dtype=torch.float64)
    second = gp.posterior()
    assert second is not first
    x = torch.randn(4, 3, dtype=torch.float64)
    rebuilt = _gp(gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=torch.full((10,), 0.3, dtype=torch.float64)))
    assert torch.allclose(second.covariance(x), rebuilt.posterior().covariance(x), rtol=1e-12, atol=0)
