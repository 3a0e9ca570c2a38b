"""Pathwise function samples: their mean and covariance converge to the exact posterior's (float64).

Monte Carlo error bound: with ``S`` independent samples of a Gaussian, the sample mean of entry
``i`` has standard error :math:`\\sqrt{\\Sigma_{ii}/S}` and the sample covariance of ``(i, j)``
:math:`\\sqrt{(\\Sigma_{ii}\\Sigma_{jj} + \\Sigma_{ij}^2)/S}`; every entry must lie within 5 standard
errors (a chance failure below 1e-5 over all entries; the draws are seeded, so the test is
deterministic). The truth is the exact posterior (or prior) of the same GP, tested against brute
force in ``test_against_truth.py``.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
import truth

import ntkgp
from ntkgp.models.samples import posterior_samples, prior_samples

S = 4000


def _check(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """``samples`` ``(S, m)`` against the Gaussian ``(mean (m,), cov (m, m))``, within 5 standard errors."""
    n = samples.shape[0]
    diag = cov.diagonal()
    assert ((samples.mean(0) - mean).abs() <= 5 * (diag / n).sqrt()).all()
    centred = samples - samples.mean(0)
    empirical = centred.T @ centred / (n - 1)
    se = ((diag[:, None] * diag[None, :] + cov.square()) / n).sqrt()
    assert ((empirical - cov).abs() <= 5 * se).all()


def _gp(solver: str, laplace: bool = False) -> ntkgp.LinearizedGP:
    x, y = truth.toy_regression(40, 3, 2 if not laplace else 1, seed=1)
    net = truth.mlp(3, 10 if solver == "kernel" else 2, 2 if not laplace else 3, seed=2).eval()
    if laplace:
        labels = (y > 0).long() + (y > 1).long()
        return ntkgp.LinearizedGP(net, ntkgp.likelihoods.SoftmaxLikelihood(num_classes=3), x, labels, solver=solver)
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, has_task_noise=False).double()
    lik.noise = 0.05
    return ntkgp.LinearizedGP(net, lik, x, y, prior_precision=2.0, solver=solver)


@pytest.mark.parametrize("solver,laplace", [("kernel", False), ("weight", False), ("kernel", True), ("weight", True)])
def test_posterior_samples_converge_to_the_exact_posterior(solver: str, laplace: bool) -> None:
    model = _gp(solver, laplace).eval()
    assert model.solver.name == solver
    x_test = torch.randn(4, 3, dtype=torch.float64)
    draws = posterior_samples(model, S, generator=torch.Generator().manual_seed(0))
    values = draws(x_test)  # shape: (S, 4, C)
    assert values.shape == (S, 4, model.num_outputs)
    with torch.no_grad():
        exact = model(x_test)
    _check(values.reshape(S, -1), exact.mean.reshape(-1), exact.covariance_matrix)
    assert torch.equal(draws(x_test), values)  # the same functions at every call


def test_prior_samples_converge_to_the_prior() -> None:
    model = _gp("kernel").eval()
    x_test = torch.randn(3, 3, dtype=torch.float64)
    values = prior_samples(model, S, generator=torch.Generator().manual_seed(1))(x_test)
    with torch.no_grad(), gpytorch.settings.prior_mode(True):
        prior = model(x_test)
    _check(values.reshape(S, -1), prior.mean.reshape(-1), prior.covariance_matrix.to_dense())


def test_samples_after_add_data_batched_inputs_and_gradients() -> None:
    x, y = truth.toy_regression(40, 3, seed=1)
    net = truth.mlp(3, 10, 1, seed=2).eval()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = 0.05
    model = ntkgp.LinearizedGP(net, lik, x[:30], y[:30], solver="kernel").eval()
    model.posterior()
    model.add_data(x[30:], y[30:])  # a bordered factor: the samples solve with it
    x_test = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    draws = posterior_samples(model, S, generator=torch.Generator().manual_seed(2))
    values = draws(x_test)
    assert values.shape == (S, 2, 3, 1)
    with torch.no_grad():
        exact = model(x_test.detach().reshape(6, 3))
    _check(values.detach().reshape(S, 6), exact.mean, exact.covariance_matrix)
    values[:3].sum().backward()  # differentiable in the inputs (Thompson sampling by gradients)
    assert x_test.grad is not None and torch.isfinite(x_test.grad).all() and x_test.grad.abs().sum() > 0


def test_approximate_posteriors_are_refused() -> None:
    x, y = truth.toy_regression(30, 3, seed=1)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    model = ntkgp.LinearizedGP(truth.mlp(3, 6, 1).eval(), lik, x, y, solver=ntkgp.solvers.Lanczos(rank=5)).eval()
    with pytest.raises(NotImplementedError, match="exact solver"):
        posterior_samples(model, 4)
