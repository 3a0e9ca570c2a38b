"""``fit_by_validation``: the held-out NLL against a float64 brute force, the optimum found, bad input."""

from __future__ import annotations

import importlib
import math

import gpytorch
import pytest
import torch
import truth

import ntkgp
from ntkgp.likelihoods import BernoulliLikelihood, SoftmaxLikelihood
from ntkgp.marglik import fit_by_validation, validation_nll


def _split(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def _softmax_problem():
    x, noise = _split(60, 2, 11)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5 + noise).long()  # noisy labels: the MAP (weak prior) overfits
    net = truth.mlp(2, 6, 3, seed=12)
    lik = SoftmaxLikelihood(num_classes=3)
    truth.train_map_loss(net, x[:40], lambda f: -lik.log_likelihood(f, y[:40]), truth.prior_vector(net, 0.1))
    return net.eval(), lik, x[:40], y[:40], x[40:], y[40:]


def _brute_softmax_nll(net, x, y, xv, yv, delta: float) -> float:
    """Probit predictive NLL in float64 from explicit Jacobians and the GGN at the network's weights."""
    j, jv = truth.jacobian(net, x), truth.jacobian(net, xv)
    C = 3
    with torch.no_grad():
        f, fv = net(x), net(xv)
    p = f.softmax(-1)
    hessians = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # shape: (N, C, C)
    ggn = sum(j[i * C : (i + 1) * C].T @ hessians[i] @ j[i * C : (i + 1) * C] for i in range(len(x)))
    precision = ggn + delta * torch.eye(j.shape[1], dtype=torch.float64)
    cov = jv @ torch.linalg.solve(precision, jv.T)
    var = cov.diagonal().reshape(-1, C)
    probs = (fv / (1 + math.pi / 8 * var).sqrt()).softmax(-1)
    return float(-probs.gather(1, yv[:, None]).log().mean())


def test_validation_nll_matches_the_brute_force_probit_predictive() -> None:
    net, lik, x, y, xv, yv = _softmax_problem()
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.0).eval()
    for delta in (0.3, 2.0, 40.0):
        model.prior_precision = delta
        got = validation_nll(model, xv, yv)
        assert abs(got - _brute_softmax_nll(net, x, y, xv, yv, delta)) <= 1e-10 * max(1.0, abs(got))


def test_fit_by_validation_finds_the_minimum_of_the_held_out_nll() -> None:
    """The chosen factor's NLL is within round-off of the brute-force minimum over a fine grid, and below
    every grid point's; the model is left at it."""
    net, lik, x, y, xv, yv = _softmax_problem()
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=2.0)
    fit = fit_by_validation(model, xv, yv, tolerance=1e-4)
    assert not fit.at_grid_edge and fit.evaluations == len(fit.curve) > 17
    assert torch.equal(model.prior_precision.detach(), fit.prior_precision)
    assert abs(float(fit.prior_precision) - 2.0 * fit.scale) <= 1e-12 * 2.0 * fit.scale
    brute = _brute_softmax_nll(net, x, y, xv, yv, float(fit.prior_precision))
    assert abs(brute - fit.validation_nll) <= 1e-10
    fine = [_brute_softmax_nll(net, x, y, xv, yv, 2.0 * s) for s in torch.logspace(-2, 6, 161).tolist()]
    assert fit.validation_nll <= min(fine) + 1e-9
    assert fit.validation_nll <= min(v for _, v in fit.curve[:17])


def test_fit_by_validation_gaussian_keeps_the_noise_and_uses_the_marginal_density() -> None:
    x, y = truth.toy_regression(50, 3, seed=21)
    net = truth.mlp(3, 8, 1, seed=22)
    truth.train_map(net, x[:35], y[:35], truth.prior_vector(net, 1.0), 0.05)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = 0.05
    noise = float(lik.noise.detach())
    model = ntkgp.LinearizedGP(net.eval(), lik, x[:35], y[:35], prior_precision=1.0)
    fit = fit_by_validation(model, x[35:], y[35:])
    assert float(lik.noise.detach()) == noise
    delta = float(fit.prior_precision)
    # brute force: the linearized GP's posterior at the held-out points, plus the noise
    j, jv, theta = truth.jacobian(net, x[:35]), truth.jacobian(net, x[35:]), truth.flat_params(net)
    with torch.no_grad():
        f, fv = net(x[:35])[:, 0], net(x[35:])[:, 0]
    prior = torch.full((j.shape[1],), delta, dtype=torch.float64)
    cov = truth.posterior_covariance(j, jv, prior, torch.full((35,), noise, dtype=torch.float64))
    precision = j.T @ j / noise + torch.diag(prior)
    m, mv = f - j @ theta, fv - jv @ theta
    theta_post = torch.linalg.solve(precision, j.T @ (y[:35] - m) / noise)
    mean = mv + jv @ theta_post
    nll = -torch.distributions.Normal(mean, (cov.diagonal() + noise).sqrt()).log_prob(y[35:]).mean()
    assert abs(float(nll) - fit.validation_nll) <= 1e-9 * max(1.0, abs(float(nll)))


def test_fit_by_validation_bernoulli_and_warns_at_the_grid_edge() -> None:
    x, noise = _split(50, 2, 31)
    y = (x[:, 0] + 0.3 * noise > 0).double()
    net = truth.mlp(2, 5, 1, seed=32).eval()
    model = ntkgp.LinearizedGP(net, BernoulliLikelihood(), x[:30], y[:30], prior_precision=1.0)
    with pytest.warns(UserWarning, match="edge of the grid"):
        fit = fit_by_validation(model, x[30:], y[30:], scales=(1e-9, 1e-8, 1e-7))
    assert fit.at_grid_edge and fit.evaluations == 3
    assert fit.scale == pytest.approx(1e-7)  # the weakest prior has the widest, worst predictive here


def test_validation_nll_bernoulli_matches_the_brute_force_probit() -> None:
    x, noise = _split(50, 2, 31)
    y = (x[:, 0] + 0.3 * noise > 0).double()
    net = truth.mlp(2, 5, 1, seed=32).eval()
    model = ntkgp.LinearizedGP(net, BernoulliLikelihood(), x[:30], y[:30], prior_precision=0.7).eval()
    j, jv = truth.jacobian(net, x[:30]), truth.jacobian(net, x[30:])
    with torch.no_grad():
        f, fv = net(x[:30])[:, 0], net(x[30:])[:, 0]
    lam = f.sigmoid() * (1 - f.sigmoid())
    precision = j.T @ (lam[:, None] * j) + 0.7 * torch.eye(j.shape[1], dtype=torch.float64)
    var = (jv @ torch.linalg.solve(precision, jv.T)).diagonal()
    p = (fv / (1 + math.pi / 8 * var).sqrt()).sigmoid()
    brute = -(y[30:] * p.log() + (1 - y[30:]) * (1 - p).log()).mean()
    assert abs(validation_nll(model, x[30:], y[30:]) - float(brute)) <= 1e-10


def test_fit_by_validation_scales_every_group_by_one_factor() -> None:
    net, lik, x, y, xv, yv = _softmax_problem()
    start = torch.tensor([0.5, 2.0, 3.0, 8.0], dtype=torch.float64)  # one per parameter tensor
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=start.clone())
    fit = fit_by_validation(model, xv, yv)
    assert float((fit.prior_precision / start - fit.scale).abs().max()) <= 1e-12 * fit.scale
    assert not model.training


def test_fit_by_validation_restores_the_precisions_on_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    net, lik, x, y, xv, yv = _softmax_problem()
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=3.0)
    validation = importlib.import_module("ntkgp.marglik.validation")
    calls = []

    def failing(*args: object) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return 1.0

    monkeypatch.setattr(validation, "validation_nll", failing)
    with pytest.raises(RuntimeError, match="injected"):
        fit_by_validation(model, xv, yv)
    assert float(model.prior_precision) == pytest.approx(3.0, rel=1e-12)
    monkeypatch.setattr(validation, "validation_nll", lambda *args: math.nan)
    with pytest.raises(ValueError, match="not finite at any factor"):
        fit_by_validation(model, xv, yv)
    assert float(model.prior_precision) == pytest.approx(3.0, rel=1e-12)


def test_fit_by_validation_rejects_bad_input() -> None:
    net, lik, x, y, xv, yv = _softmax_problem()
    model = ntkgp.LinearizedGP(net, lik, x, y)
    with pytest.raises(ValueError, match="y_val has 19 targets but x_val has 20 points"):
        fit_by_validation(model, xv, yv[:19])
    bad = xv.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_val"):
        fit_by_validation(model, bad, yv)
    with pytest.raises(ValueError, match="positive and finite"):
        fit_by_validation(model, xv, yv, scales=(0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="at least 3"):
        fit_by_validation(model, xv, yv, scales=(1.0, 2.0))
    with pytest.raises(ValueError, match="increasing"):
        fit_by_validation(model, xv, yv, scales=(3.0, 2.0, 1.0))
    for tolerance in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="tolerance"):
            fit_by_validation(model, xv, yv, tolerance=tolerance)
