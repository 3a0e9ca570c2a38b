"""Issue 16: the linearized model's mode, fast post-hoc hyperparameter fits, prior structures.

Truths are brute-force float64 weight-space computations (tests/truth.py): Newton on the GLM with
autograd Hessians, explicit Jacobians, explicit inverses and log-determinants.
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Any

import gpytorch
import pytest
import torch
import torch.nn.functional as F
import truth

import ntkgp
from ntkgp.likelihoods import BernoulliLikelihood, NaturalGaussianLikelihood, SoftmaxLikelihood
from ntkgp.marglik import ConvergenceWarning, fit_hyperparameters


# ------------------------------------------------------------------ problems (not at a MAP)
def _softmax():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y, truth.mlp(2, 5, 3, seed=7), SoftmaxLikelihood(num_classes=3)


def _bernoulli():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(30, generator=g, dtype=torch.float64) > 0).double()
    return x, y, truth.mlp(2, 5, 1, seed=8), BernoulliLikelihood()


def _natural():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, 1, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x[:, 0]) + 0.2 * torch.randn(30, generator=g, dtype=torch.float64)
    net = truth.mlp(1, 5, 2, seed=9)
    with torch.no_grad():  # eta2 = -1/(2 sigma^2) < 0 at the start: a bias of -2 on the second output
        net[-1].bias[1] = -2.0
        net[-1].weight[1] *= 0.1
    return x, y, net, NaturalGaussianLikelihood()


def _nll(lik, y):
    return lambda f: -lik.log_likelihood(f, y)


def _brute_mode(net, x, y, lik, delta):
    """Newton on the GLM -log p(y | m + J t) + delta/2 |t|^2 in float64, autograd Hessians."""
    j, theta = truth.jacobian(net, x), truth.flat_params(net)
    with torch.no_grad():
        f_hat = net(x).reshape(-1).to(torch.float64)
    m, n, c = f_hat - j @ theta, x.shape[0], f_hat.numel() // x.shape[0]

    def obj(t):
        return -lik.log_likelihood((m + j @ t).reshape(n, c), y) + 0.5 * delta * t.square().sum()

    t = theta.clone()
    for _ in range(20):  # quadratic convergence: round-off in under ten steps
        grad = torch.autograd.functional.jacobian(obj, t)
        t = t - torch.linalg.solve(torch.autograd.functional.hessian(obj, t), grad)
    f = (m + j @ t).reshape(n, c)
    hess = torch.stack(
        [
            torch.autograd.functional.hessian(lambda v, i=i: -lik.log_likelihood(v[None], y[i : i + 1]), f[i])
            for i in range(n)
        ]
    )
    precision = j.T @ torch.block_diag(*hess) @ j + delta * torch.eye(t.numel(), dtype=torch.float64)
    p = t.numel()
    evidence = -obj(t) - 0.5 * (torch.logdet(precision) - p * math.log(delta))
    return t, float(evidence), precision, m


def _perturb(net, x, y, lik, steps=25):
    """A few Adam steps on the likelihood alone: a network that is at no MAP of the prior."""
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (-lik.log_likelihood(net(x), y)).backward()
        opt.step()
    return net.eval()


@pytest.mark.parametrize("make", [_softmax, _bernoulli, _natural])
@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_linearized_mode_matches_brute_force_glm_newton(make, solver) -> None:
    x, y, net, lik = make()
    net = _perturb(net, x, y, lik)
    delta = 1.7
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=delta, solver=solver, mode="auto")
    assert model.mode == "linearized"  # auto: the network is not at a MAP of the stated prior
    evidence = float(model.log_evidence())
    state = model.mode_finder.state(model.prior_precision)
    t, brute, precision, m = _brute_mode(net, x, y, lik, delta)
    assert state.converged and 1 <= state.iterations <= 15
    assert float((state.theta - t).abs().max()) <= 1e-8 * max(1.0, float(t.abs().max()))
    assert abs(evidence - brute) <= 1e-8 * abs(brute)
    xs = x[:7] + 0.3
    js = truth.jacobian(net, xs)
    with torch.no_grad():
        fs = net(xs).reshape(-1).to(torch.float64)
    post = model.posterior()
    mean = fs - js @ truth.flat_params(net) + js @ t
    cov = js @ torch.linalg.inv(precision) @ js.T
    assert torch.allclose(post.mean(xs).reshape(-1), mean, rtol=0, atol=1e-8 * float(mean.abs().max()))
    assert torch.allclose(post.covariance(xs), cov, rtol=0, atol=1e-8 * float(cov.abs().max()))


def test_evidence_gradient_at_the_mode_includes_the_implicit_term() -> None:
    x, y, net, lik = _softmax()
    net = _perturb(net, x, y, lik)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=2.0, mode="linearized")
    raw = model.covar_module.raw_prior_precision
    (grad_raw,) = torch.autograd.grad(model.log_evidence(), raw)
    r = raw.detach().clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(model.covar_module.raw_prior_precision_constraint.transform(r).sum(), r)
    eps = 1e-4
    fd = (_brute_mode(net, x, y, lik, 2.0 * (1 + eps))[1] - _brute_mode(net, x, y, lik, 2.0 * (1 - eps))[1]) / (4 * eps)
    assert abs(float(grad_raw / slope) - fd) <= 1e-6 * abs(fd)


def _log_delta_gradient(model) -> torch.Tensor:
    """The gradient of ``model.log_evidence()`` in :math:`\\log\\delta` ``(G,)``, through the raw parameter."""
    raw = model.covar_module.raw_prior_precision
    (grad_raw,) = torch.autograd.grad(model.log_evidence(), raw)
    r = raw.detach().clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(model.covar_module.raw_prior_precision_constraint.transform(r).sum(), r)
    return (grad_raw / slope * model.prior_precision.detach()).to(torch.float64)


@pytest.mark.parametrize("make", [_softmax, _bernoulli])
@pytest.mark.parametrize("solver", ["kernel", "weight"])
@pytest.mark.parametrize("prior", ["scalar", "module"])
def test_evidence_gradient_at_the_mode_is_the_converged_finite_difference(make, solver, prior) -> None:
    """In both spaces and per group: the gradient in log delta at a warm-started mode equals central differences
    (step 1e-4) of the evidence, each difference point a fresh model (cold start from the network's weights,
    Newton to round-off), to 1e-7 relative. Kernel space takes its implicit term from the cached Grams."""
    x, y, net, lik = make()
    net = _perturb(net, x, y, lik)
    start = {"scalar": 1.7, "module": "module"}[prior]
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=start, solver=solver, mode="linearized")
    model.log_evidence()
    delta = model.prior_precision.detach().clone() * torch.linspace(0.6, 1.4, model.layout.num_groups)
    model.prior_precision = delta  # a mode warm-started from another prior precision's
    grad = _log_delta_gradient(model)
    h = 1e-4

    def evidence(log_delta: torch.Tensor) -> float:
        fresh = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=start, solver=solver, mode="linearized")
        fresh.prior_precision = log_delta.exp()
        with torch.no_grad():
            value = float(fresh.log_evidence())
        assert fresh.mode_finder.state(fresh.prior_precision).converged
        return value

    s = delta.to(torch.float64).log()
    for g in range(s.numel()):
        e = torch.zeros_like(s)
        e[g] = h
        fd = (evidence(s + e) - evidence(s - e)) / (2 * h)
        assert abs(float(grad[g]) - fd) <= 1e-7 * max(1.0, abs(fd)), (g, float(grad[g]), fd)


def _float32_problem(kind: str):
    """A float32 MLP (16-16-C) on 200 points after 100 Adam steps on the likelihood alone: at no MAP."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 16, generator=g)
    w = torch.randn(16, generator=g)
    if kind == "bernoulli":
        y = (x @ w + 0.5 * torch.randn(200, generator=g) > 0).float()
        net, lik = truth.mlp(16, 16, 1, seed=7, dtype=torch.float32), BernoulliLikelihood()
    else:
        y = (x @ w > 0).long() + (x[:, 0] > 0.5).long()
        net, lik = truth.mlp(16, 16, 3, seed=7, dtype=torch.float32), SoftmaxLikelihood(num_classes=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        (-lik.log_likelihood(net(x), y)).backward()
        opt.step()
    return x, y, net.eval(), lik


@pytest.mark.parametrize("kind", ["bernoulli", "softmax"])
@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_fit_at_the_linearized_mode_of_a_float32_network_converges(kind, solver) -> None:
    """A float32 network's evidence at the linearized mode carries its passes' round-off (about 1e-6 nats
    here): the strong-Wolfe line search compared noise near the optimum, and the Bernoulli fit in kernel space
    stopped after 26 evaluations at |g| = 4.4e-4 > 1e-4, not converged. With the gradient-only finish and the
    kernel-space implicit term from the Grams it converges in at most 12 evaluations."""
    x, y, net, lik = _float32_problem(kind)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.0, solver=solver, mode="linearized")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit = fit_hyperparameters(model)
    assert fit.method == "lbfgs" and fit.converged and fit.gradient_norm <= 1e-4
    assert fit.evaluations <= 12, fit.evaluations
    assert torch.equal(model.prior_precision.detach(), fit.prior_precision)
    assert abs(float(model.log_evidence()) - fit.log_evidence) <= 1e-4  # at the fitted point, up to round-off


def test_auto_mode_keeps_a_map_network_and_map_mode_is_the_default_and_keeps_the_network() -> None:
    x, y, net, lik = _softmax()
    truth.train_map_loss(net, x, lambda f: F.cross_entropy(f, y, reduction="sum"), truth.prior_vector(net, 1.0))
    model = ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision=1.0, mode="auto")
    assert model.mode == "map" and model.mode_finder is None
    perturbed = _perturb(net, x, y, lik, steps=5)
    assert ntkgp.LinearizedGP(perturbed, lik, x, y, prior_precision=1.0).mode == "map"  # the default
    model = ntkgp.LinearizedGP(perturbed, lik, x, y, prior_precision=1.0, mode="map")
    assert model.mode == "map"
    with torch.no_grad():
        assert torch.allclose(model.posterior().mean(x), perturbed(x), atol=1e-12)
    with pytest.raises(ValueError, match="mode"):
        ntkgp.LinearizedGP(perturbed, lik, x, y, mode="newton")


# ------------------------------------------------------------------ fitting
def _regression(solver):
    x, y = truth.toy_regression(40, 3, seed=41)
    net = truth.mlp(3, 8, 1, seed=42)
    truth.train_map(net, x, y, truth.prior_vector(net, 1.0), 0.04)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = 0.04
    return x, y, net, ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision=1.0, solver=solver)


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_spectral_gaussian_fit_is_the_brute_force_optimum(solver) -> None:
    x, y, net, model = _regression(solver)
    fit = fit_hyperparameters(model, tolerance=1e-6)  # weight space: r'r/s - b'A^-1 b/s^2 cancels to ~1e-7
    assert fit.method == "spectral" and fit.converged and fit.gradient_norm <= 1e-6
    delta, noise = float(fit.prior_precision), float(fit.noise)

    j = truth.jacobian(net, x)  # once: the brute-force evidence is log N(y; f - J theta, J J^T / d + s I)
    with torch.no_grad():
        mean = net(x).reshape(-1).to(torch.float64) - j @ truth.flat_params(net)

    def brute(d, s):
        cov = j @ j.T / d + s * torch.eye(40, dtype=torch.float64)
        return float(torch.distributions.MultivariateNormal(mean, cov).log_prob(y.reshape(-1)))

    assert abs(brute(delta, noise) - fit.log_evidence) <= 1e-9 * max(1.0, abs(fit.log_evidence))
    h = 1e-4  # a stationary point of the brute-force evidence in (log delta, log noise)
    d_log_delta = (brute(delta * math.exp(h), noise) - brute(delta * math.exp(-h), noise)) / (2 * h)
    d_log_noise = (brute(delta, noise * math.exp(h)) - brute(delta, noise * math.exp(-h))) / (2 * h)
    assert abs(d_log_delta) < 1e-5 and abs(d_log_noise) < 1e-5
    _, _, _, other = _regression(solver)
    lbfgs = fit_hyperparameters(other, method="lbfgs", tolerance=1e-6)
    assert lbfgs.converged and abs(lbfgs.log_evidence - fit.log_evidence) <= 1e-10
    _, _, _, adam = _regression(solver)
    old = fit_hyperparameters(adam, steps=10, lr=0.1)  # the former route: not at the optimum
    assert old.method == "adam" and len(old.curve) == 10 and old.log_evidence < fit.log_evidence


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_spectral_laplace_fit_agrees_with_lbfgs_and_brute_force(solver) -> None:
    x, y, net, lik = _softmax()
    truth.train_map_loss(net, x, lambda f: F.cross_entropy(f, y, reduction="sum"), truth.prior_vector(net, 1.0))
    model = ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision=1.0, solver=solver, mode="map")
    fit = fit_hyperparameters(model)
    assert fit.method == "spectral" and fit.converged
    with torch.no_grad():
        out = net(x)
    hess = truth.nll_hessians(lambda v, n: -torch.log_softmax(v, -1)[y[n]], out)
    delta = float(fit.prior_precision)
    brute = truth.ggn_laplace(
        net, x, x[:2], hess, truth.prior_vector(net, delta), -F.cross_entropy(out, y, reduction="sum")
    )[0]
    assert abs(float(brute) - fit.log_evidence) <= 1e-9 * abs(fit.log_evidence)
    other = ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision=1.0, solver=solver, mode="map")
    lbfgs = fit_hyperparameters(other, method="lbfgs", tolerance=1e-7)
    assert abs(float(lbfgs.prior_precision) / delta - 1) < 1e-5


def test_per_group_fit_at_the_linearized_mode_converges_and_warns_when_cut_short() -> None:
    x, y, net, lik = _softmax()
    net = _perturb(net, x, y, lik)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision="module", mode="linearized")
    assert model.layout.group_names == ("0", "2") and model.mode == "linearized"
    fit = fit_hyperparameters(model)
    assert fit.method == "lbfgs" and fit.converged and fit.prior_precision.shape == (2,)
    assert abs(float(model.log_evidence()) - fit.log_evidence) <= 1e-9 * abs(fit.log_evidence)
    short = ntkgp.LinearizedGP(net, lik, x, y, prior_precision="tensor", mode="linearized")
    assert short.layout.num_groups == 4
    with pytest.warns(ConvergenceWarning, match="gradient norm"):
        result = fit_hyperparameters(short, max_iter=1)
    assert not result.converged


def test_prior_structure_strings() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).double()
    layout = ntkgp.PriorLayout.from_spec([n for n, _ in net.named_parameters()], [4] * 6, "module")
    assert layout.group_names == ("0", "1", "2") and layout.tensor_group == (0, 0, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="structure|one of"):
        ntkgp.PriorLayout.from_spec(["w"], [1], "layer")


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_linearized_mode_builds_one_solver_per_prior_precision(solver, monkeypatch) -> None:
    """The Jacobian does not move with the Newton iterate, only Lambda does. Weight space: one exact solver (a
    GGN, its capture pass, a factorization) per evidence evaluation, at the mode, however many Newton steps it
    takes. Kernel space: a solver per step from the cached Grams, with no capture pass for it. The evidence
    stays the brute-force one."""
    capture_module = importlib.import_module("ntkgp.ntk.captures")  # the package re-exports a function of that name
    laplace_module = importlib.import_module("ntkgp.solvers.laplace")

    x, y, net, lik = _softmax()
    net = _perturb(net, x, y, lik)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=2.0, solver=solver, mode="linearized")
    raw = model.covar_module.raw_prior_precision
    torch.autograd.grad(model.log_evidence(), raw)  # the first solve, from the network's weights
    counts = {"builds": 0, "captures": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        laplace_module.LaplaceSolver, "__init__", counted("builds", laplace_module.LaplaceSolver.__init__)
    )
    # every capture pass (the autograd pass, or a plain MLP's closed form) goes through this function
    monkeypatch.setattr(
        capture_module, "captures_with_outputs", counted("captures", capture_module.captures_with_outputs)
    )
    for delta in (3.0, 9.0):
        counts.update(builds=0, captures=0)
        model.prior_precision = delta
        evidence = model.log_evidence()
        torch.autograd.grad(evidence, raw)  # the implicit term's solves too
        state = model.mode_finder.state(model.prior_precision)
        assert state.converged and state.iterations >= 2  # several Newton steps from the last mode
        if solver == "weight":
            assert counts["builds"] == 1, counts
            assert counts["captures"] <= 2, counts  # the build's capture pass, and the implicit term's Jacobian
        else:  # the implicit term's covariance blocks at the training points capture them (twice)
            assert counts["builds"] == state.iterations and counts["captures"] <= 2, counts  # one per new iterate
        brute = _brute_mode(net, x, y, lik, delta)[1]
        assert abs(float(evidence) - brute) <= 1e-8 * abs(brute)


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_linearized_mode_checks_memory_once_not_at_every_newton_step(solver, monkeypatch) -> None:
    """Free memory is read when the first solve starts, for every solver the Newton solves will hold; later
    builds are not checked again (free memory then counts the finder's own solvers against it, and a solve that
    fits was refused midway with a KernelTooLargeError)."""
    memory = importlib.import_module("ntkgp.memory")
    x, y, net, lik = _softmax()
    net = _perturb(net, x, y, lik)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=2.0, solver=solver, mode="linearized")
    model.log_evidence()  # the route is chosen and its memory checked
    monkeypatch.setattr(memory, "available_memory", lambda device: 0)  # other allocations took the free memory
    model.prior_precision = 6.0
    evidence = float(model.log_evidence().detach())  # new Newton steps and a new solver at the new mode
    assert model.mode_finder.state(model.prior_precision).iterations >= 1
    brute = _brute_mode(net, x, y, lik, 6.0)[1]
    assert abs(evidence - brute) <= 1e-8 * abs(brute)
    fresh = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=2.0, solver=solver, mode="linearized")
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20)  # the check itself still refuses
    with pytest.raises(ntkgp.KernelTooLargeError):
        fresh.log_evidence()


def _module_prior_fit_and_a_fresh_copy() -> tuple[ntkgp.LinearizedGP, Any]:
    """A softmax GP at its MAP with per-module priors, unfitted, and the L-BFGS fit of an identical one."""
    x, y, net, lik = _softmax()
    truth.train_map_loss(net, x, lambda f: F.cross_entropy(f, y, reduction="sum"), truth.prior_vector(net, 1.0))
    clean = ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision="module", mode="map")
    want = fit_hyperparameters(clean, method="lbfgs", tolerance=1e-7)
    return ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision="module", mode="map"), want


def test_lbfgs_treats_a_failed_factorization_at_a_trial_point_as_a_rejected_step(monkeypatch) -> None:
    """A line-search trial whose factor is not positive definite (extreme prior precisions) backtracks;
    the fit reaches the same optimum as one whose trials all factor. Only the starting point raises."""
    from ntkgp.errors import NotPositiveDefiniteError

    model, want = _module_prior_fit_and_a_fresh_copy()
    evidence, calls = model.log_evidence, []

    def failing_once() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # the first line-search trial
            raise NotPositiveDefiniteError("the Laplace factor is not positive definite (injected)")
        return evidence()

    monkeypatch.setattr(model, "log_evidence", failing_once)
    got = fit_hyperparameters(model, method="lbfgs", tolerance=1e-7)
    assert got.converged and len(calls) > 2
    assert torch.allclose(got.prior_precision, want.prior_precision, rtol=1e-5, atol=0)
    monkeypatch.setattr(model, "log_evidence", lambda: (_ for _ in ()).throw(NotPositiveDefiniteError("start")))
    with pytest.raises(NotPositiveDefiniteError, match="start"):
        fit_hyperparameters(model, method="lbfgs")


def test_lbfgs_treats_a_non_finite_evidence_gradient_at_a_trial_point_as_a_rejected_step(monkeypatch) -> None:
    """A line-search trial whose evidence gradient is not finite (as at delta = 1e-192 in a BO loop, where
    the kernel's 1/delta overflows) backtracks instead of turning L-BFGS's direction into NaN; the fit
    reaches the clean fit's optimum. A non-finite gradient at the starting point raises a clear error."""
    model, want = _module_prior_fit_and_a_fresh_copy()
    evidence, calls = model.log_evidence, []

    def non_finite_gradient() -> torch.Tensor:  # the value is the evidence's, its gradient NaN
        return evidence() + (0.0 * model.covar_module.raw_prior_precision.sum()).sqrt()

    def once() -> torch.Tensor:
        calls.append(1)
        return non_finite_gradient() if len(calls) == 2 else evidence()  # the first line-search trial

    monkeypatch.setattr(model, "log_evidence", once)
    got = fit_hyperparameters(model, method="lbfgs", tolerance=1e-7)
    assert got.converged and len(calls) > 2
    assert torch.isfinite(got.prior_precision).all()
    assert torch.allclose(got.prior_precision, want.prior_precision, rtol=1e-5, atol=0)
    monkeypatch.setattr(model, "log_evidence", non_finite_gradient)
    with pytest.raises(ValueError, match="not finite at the starting hyperparameters"):
        fit_hyperparameters(model, method="lbfgs")
