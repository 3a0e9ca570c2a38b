"""The subset-of-data route against the exact GP of the subset itself (an independent model on
``x[idx], y[idx]``), for Gaussian and softmax likelihoods, with and without the M/N prior rescaling."""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
import truth

import ntkgp
from ntkgp.likelihoods import SoftmaxLikelihood
from ntkgp.solvers import SubsetOfData


def _gaussian(noise: float = 0.09) -> gpytorch.likelihoods.GaussianLikelihood:
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = noise
    return lik


def _predict(model: ntkgp.LinearizedGP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        f = model(x)
        return f.mean, f.covariance_matrix


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("prior_spec", [2.0, [0.5, 3.0, 1.5, 4.0]])
def test_gaussian_equals_the_subset_gp(rescale: bool, prior_spec) -> None:
    x, y = truth.toy_regression(40, 3, seed=1)
    x_test, _ = truth.toy_regression(6, 3, seed=2)
    net = truth.mlp(3, 16, 1, seed=3).eval()
    idx = torch.tensor([0, 3, 4, 10, 17, 22, 29, 31, 38])
    n, m = x.shape[0], idx.numel()
    prior = torch.as_tensor(prior_spec, dtype=torch.float64)
    model = ntkgp.LinearizedGP(
        net, _gaussian(), x, y, prior_precision=prior, solver=SubsetOfData(indices=idx, rescale_prior=rescale)
    )
    scale = n / m if rescale else 1.0
    reference = ntkgp.LinearizedGP(net, _gaussian(), x[idx], y[idx], prior_precision=prior * scale, solver="kernel")
    evidence, ref_evidence = model.log_evidence(), reference.log_evidence()
    # the subset's evidence scaled by N/M (the 2 pi constant of N points included)
    assert torch.allclose(evidence, (n / m) * ref_evidence, rtol=1e-11)
    # gradients with respect to delta (raw gradients divided by the softplus derivative, sigmoid(raw)):
    # the model's evidence is (N/M) E_ref(delta * scale), so dE/d delta = (N/M) scale dE_ref/d delta_ref
    raw, ref_raw = model.covar_module.raw_prior_precision, reference.covar_module.raw_prior_precision
    grad = torch.autograd.grad(evidence, raw)[0] / torch.sigmoid(raw.detach())
    ref_grad = torch.autograd.grad(ref_evidence, ref_raw)[0] / torch.sigmoid(ref_raw.detach())
    assert torch.allclose(grad, (n / m) * scale * ref_grad, rtol=1e-8, atol=1e-12)
    mean, cov = _predict(model, x_test)
    ref_mean, ref_cov = _predict(reference, x_test)
    assert torch.allclose(mean, ref_mean, rtol=1e-9, atol=1e-12)
    assert torch.allclose(cov, ref_cov, rtol=1e-9, atol=1e-12)


def test_network_mean_and_rescaling_shrinks_variance() -> None:
    x, y = truth.toy_regression(60, 3, seed=4)
    x_test, _ = truth.toy_regression(5, 3, seed=5)
    net = truth.mlp(3, 16, 1, seed=6).eval()
    gen = torch.Generator().manual_seed(0)
    plain = ntkgp.LinearizedGP(
        net, _gaussian(), x, y, solver=SubsetOfData(num_points=10, rescale_prior=False, generator=gen, mean="network")
    )
    gen = torch.Generator().manual_seed(0)
    scaled = ntkgp.LinearizedGP(
        net, _gaussian(), x, y, solver=SubsetOfData(num_points=10, generator=gen, mean="network")
    )
    mean_plain, cov_plain = _predict(plain, x_test)
    mean_scaled, cov_scaled = _predict(scaled, x_test)
    with torch.no_grad():
        assert torch.allclose(mean_plain, net(x_test)[:, 0], atol=1e-12)
        assert torch.allclose(mean_scaled, net(x_test)[:, 0], atol=1e-12)
    assert (cov_scaled.diagonal() < cov_plain.diagonal()).all()  # M/N = 1/6 of the prior variance


def test_softmax_laplace_equals_the_subset_gp() -> None:
    x, _ = truth.toy_regression(30, 2, seed=7)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 0] > 1).long()
    x_test, _ = truth.toy_regression(4, 2, seed=8)
    net = truth.mlp(2, 8, 3, seed=9).eval()
    idx = torch.arange(0, 30, 3)
    n, m = 30, idx.numel()
    model = ntkgp.LinearizedGP(
        net, SoftmaxLikelihood(num_classes=3), x, y, prior_precision=1.5, solver=SubsetOfData(indices=idx)
    )
    reference = ntkgp.LinearizedGP(
        net,
        SoftmaxLikelihood(num_classes=3),
        x[idx],
        y[idx],
        prior_precision=1.5 * n / m,
        solver="kernel",
        mode="map",  # SubsetOfData takes the Laplace approximation at the MAP
    )
    assert torch.allclose(
        model.solver.log_det(model.prior_precision),
        (n / m) * reference.solver.log_det(reference.prior_precision),
        rtol=1e-11,
    )
    mean, cov = _predict(model, x_test)
    ref_mean, ref_cov = _predict(reference, x_test)
    assert torch.allclose(mean, ref_mean, atol=1e-12)
    assert torch.allclose(cov, ref_cov, rtol=1e-9, atol=1e-12)


def test_bad_subset_input() -> None:
    x, y = truth.toy_regression(20, 3, seed=1)
    net = truth.mlp(3, 8, 1, seed=3).eval()
    with pytest.raises(ValueError, match="num_points must be in"):
        ntkgp.LinearizedGP(net, _gaussian(), x, y, solver=SubsetOfData(num_points=21)).log_evidence()
    with pytest.raises(ValueError, match="distinct"):
        ntkgp.LinearizedGP(net, _gaussian(), x, y, solver=SubsetOfData(indices=torch.tensor([1, 1]))).log_evidence()
    with pytest.raises(ValueError, match="mean must be"):
        SubsetOfData(mean="prior")


def test_rescaled_subset_equals_laplace_torch_functional_laplace() -> None:
    """laplace-torch's FunctionalLaplace(n_subset=M) on the same subset, in float64: the same predictive."""
    import numpy as np

    laplace = pytest.importorskip("laplace")
    from torch.utils.data import DataLoader, TensorDataset

    x, y = truth.toy_regression(60, 3, seed=11)
    x_test, _ = truth.toy_regression(5, 3, seed=12)
    net = truth.mlp(3, 16, 1, seed=13).eval()
    n, m, delta = 60, 20, 2.0
    lik = _gaussian(0.09)
    sigma = math.sqrt(float(lik.noise.detach()))  # the noise as stored (softplus round trip), for both libraries
    la = laplace.Laplace(
        net,
        "regression",
        subset_of_weights="all",
        hessian_structure="gp",
        n_subset=m,
        sigma_noise=sigma,
        prior_precision=delta,
    )
    la.fit(DataLoader(TensorDataset(x, y[:, None]), batch_size=16))
    peer_mean, peer_var = la(x_test, pred_type="gp")
    idx = torch.as_tensor(np.random.default_rng(0).choice(list(range(n)), m, replace=False))  # its SoDSampler
    assert torch.equal(la.train_loader.sampler.indices.sort().values, idx.sort().values)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=delta, solver=SubsetOfData(indices=idx, mean="network"))
    mean, cov = _predict(model, x_test)
    assert torch.allclose(mean, peer_mean.reshape(-1), rtol=1e-10, atol=1e-12)
    assert torch.allclose(cov.diagonal(), peer_var.reshape(-1), rtol=1e-8, atol=1e-12)


def test_two_outputs_with_per_output_noise() -> None:
    x, y = truth.toy_regression(30, 3, 2, seed=21)
    x_test, _ = truth.toy_regression(4, 3, 2, seed=22)
    net = truth.mlp(3, 12, 2, seed=23).eval()
    idx = torch.arange(1, 30, 4)

    def likelihood() -> gpytorch.likelihoods.MultitaskGaussianLikelihood:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, has_global_noise=False).double()
        lik.task_noises = torch.tensor([0.05, 0.2], dtype=torch.float64)
        return lik

    model = ntkgp.LinearizedGP(
        net, likelihood(), x, y, prior_precision=3.0, solver=SubsetOfData(indices=idx, rescale_prior=False)
    )
    reference = ntkgp.LinearizedGP(net, likelihood(), x[idx], y[idx], prior_precision=3.0, solver="kernel")
    assert torch.allclose(model.log_evidence(), (30 / idx.numel()) * reference.log_evidence(), rtol=1e-11)
    mean, cov = _predict(model, x_test)
    ref_mean, ref_cov = _predict(reference, x_test)
    assert torch.allclose(mean, ref_mean, rtol=1e-9, atol=1e-12)
    assert torch.allclose(cov, ref_cov, rtol=1e-9, atol=1e-12)
