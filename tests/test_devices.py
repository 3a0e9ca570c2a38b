"""The library's main paths on every available device (the ``device`` fixture: CPU, plus CUDA
when present), against independent float64 truths computed on the CPU with ``truth.py``.

Each test builds its network and data on the CPU, moves a *copy* of the network and the data to
``device``, runs ntkgp there, and compares ``.cpu()`` results with brute-force Jacobian algebra on
the CPU originals. The tolerances are those of the CPU-only tests of the same paths
(test_against_truth.py, test_classification.py, test_inducing.py, test_subset_of_data.py,
test_conjugate_gradients.py, test_lanczos.py, test_structured_gram.py, test_marglik.py). CUDA float64
is IEEE float64, so none is loosened for CUDA; a CUDA failure at these tolerances is a finding.
"""

from __future__ import annotations

import copy
import math
from functools import cache

import gpytorch
import pytest
import torch
import torch.nn.functional as F
import truth
from builders import make_ntk
from torch import Tensor, nn

import ntkgp
from ntkgp.likelihoods import NaturalGaussianLikelihood, SoftmaxLikelihood
from ntkgp.likelihoods.link import expected_sigmoid, expected_softmax
from ntkgp.marglik import SubsetEvidenceBound, class_partition, fit_online_marglik, random_partition
from ntkgp.ntk import gram, gram_diagonal
from ntkgp.solvers import ConjugateGradients, Inducing, Lanczos, SubsetOfData
from ntkgp.solvers.inducing import kmeans_points, random_points

F64 = torch.float64
REL = 1e-9  # evidence and predictive covariance against brute force (test_against_truth.py)
NOISE = 0.09
PER_TENSOR = [0.5, 3.0, 1.5, 4.0]  # one precision per tensor of a one-hidden-layer MLP
#: inducing-point comparisons with the dense truth use this jitter in both (see test_inducing.py)
JITTER = 1e-6


# ------------------------------------------------------------------------------------ helpers
def _to(net: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``net`` on ``device`` (``nn.Module.to`` is in place: cached CPU nets stay put)."""
    return copy.deepcopy(net).to(device)


def _on(t: Tensor, device: torch.device) -> Tensor:
    """Assert ``t`` lives on ``device``; return it on the CPU for comparisons."""
    assert t.device.type == device.type, f"expected a tensor on {device}, got one on {t.device}"
    return t.detach().cpu()


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.detach().cpu().to(F64) - b).abs().max() / b.abs().max())


def rel_norm(a: Tensor, b: Tensor) -> float:
    """Relative error in the Frobenius norm (test_conjugate_gradients.py's measure)."""
    return float((a.detach().cpu().to(F64) - b).norm() / b.norm())


def _gaussian_likelihood(c: int, noise: float, device: torch.device) -> gpytorch.likelihoods.Likelihood:
    if c == 1:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=c, has_task_noise=False).double()
    lik.noise = torch.tensor(noise, dtype=F64)  # a Python float would be rounded through float32
    return lik.to(device)


def _noise_rows(lik: gpytorch.likelihoods.Likelihood, c: int, n: int) -> Tensor:
    """The likelihood's noise as stored (after the softplus round trip), per row ``(n*C,)``, CPU."""
    return lik.noise.detach().cpu().reshape(-1).to(F64).expand(c).repeat(n)


def _gp_posterior(
    net: nn.Module, x: Tensor, y: Tensor, x_test: Tensor, prior: Tensor, noise_rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Dense GP posterior mean ``(N*C,)`` and covariance of the linearized model, at any weights."""
    j, jt = truth.jacobian(net, x), truth.jacobian(net, x_test)
    theta = truth.flat_params(net)
    with torch.no_grad():
        f, ft = net(x).reshape(-1).to(F64), net(x_test).reshape(-1).to(F64)
    residual = y.reshape(-1).to(F64) - (f - j @ theta)
    kernel = j @ (j / prior).T + torch.diag(noise_rows)
    mean = ft - jt @ theta + jt @ ((j / prior).T @ torch.linalg.solve(kernel, residual))
    return mean, truth.posterior_covariance(j, jt, prior, noise_rows)


# ------------------------------------------------------------------------------ problems (CPU)
@cache
def _regression_case(c: int):
    """Per-tensor prior, a tight MAP (float64), C = 1 or 2; P = 41 or 50 against N C = 40 or 80."""
    x, y = truth.toy_regression(40, 3, c, seed=1)
    x_test, _ = truth.toy_regression(7, 3, c, seed=2)
    net = truth.mlp(3, 8, c, seed=3)
    prior = truth.prior_vector(net, PER_TENSOR)
    grad = truth.train_map(net, x, y, prior, torch.full((c,), NOISE, dtype=F64))
    return net.eval(), x, y, x_test, prior, grad


@cache
def _softmax_case():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 2, generator=gen, dtype=F64)
    y = (x @ torch.randn(2, 3, generator=gen, dtype=F64)).argmax(-1)
    x_test = torch.randn(6, 2, generator=gen, dtype=F64)
    net = truth.mlp(2, 5, 3, seed=6)  # P = 33 < N C = 90
    prior = truth.prior_vector(net, PER_TENSOR)
    grad = truth.train_map_loss(net, x, lambda f: F.cross_entropy(f, y, reduction="sum"), prior)
    with torch.no_grad():
        out = net(x)
    hessians = truth.nll_hessians(lambda v, n: -torch.log_softmax(v, -1)[y[n]], out)
    log_lik = -F.cross_entropy(out, y, reduction="sum")
    return net.eval(), x, y, x_test, prior, grad, hessians, log_lik


class NaturalNet(nn.Module):
    """Outputs natural parameters (eta1, eta2 = -softplus(h)/2) of a heteroscedastic Gaussian."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 2))

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return torch.stack([h[:, 0], -F.softplus(h[:, 1]) / 2], -1)


def _gaussian_nll(v: Tensor, y: Tensor) -> Tensor:
    """-log N(y; mu, var) from natural parameters ``v = (eta1, eta2)`` ``(..., 2)``, elementwise."""
    mu, var = -v[..., 0] / (2 * v[..., 1]), -1 / (2 * v[..., 1])
    return 0.5 * (y - mu) ** 2 / var + 0.5 * torch.log(2 * math.pi * var)


@cache
def _natural_case():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(50, 1, generator=g, dtype=F64) * 6 - 3
    y = torch.sin(x[:, 0]) + (0.05 + 0.3 * (x[:, 0] > 0)) * torch.randn(50, generator=g, dtype=F64)
    torch.manual_seed(7)
    net = NaturalNet().double()
    prior = truth.prior_vector(net, 1.0)
    truth.train_map_loss(net, x, lambda f: _gaussian_nll(f, y).sum(), prior)
    with torch.no_grad():
        out = net(x)
    hessians = truth.nll_hessians(lambda v, n: _gaussian_nll(v, y[n]), out)
    log_lik = -_gaussian_nll(out, y).sum()
    x_test = torch.linspace(-4, 4, 7, dtype=F64).unsqueeze(-1)
    return net.eval(), x, y, x_test, prior, hessians, log_lik


# ------------------------------------------------------------- 1. exact Gaussian regression
@pytest.mark.parametrize("solver", ["kernel", "weight"])
@pytest.mark.parametrize("c", [1, 2])
def test_gaussian_regression_matches_brute_force(device: torch.device, c: int, solver: str) -> None:
    net, x, y, x_test, prior, grad = _regression_case(c)
    assert grad < 1e-8, "the MAP must be tight for the identities to hold"
    lik = _gaussian_likelihood(c, NOISE, device)
    xd, yd = x.to(device), y.to(device)
    model = ntkgp.LinearizedGP(_to(net, device), lik, xd, yd, prior_precision=torch.tensor(PER_TENSOR), solver=solver)
    assert model.solver.name == solver
    noise_rows = _noise_rows(lik, c, x.shape[0])
    brute = float(truth.log_evidence(net, x, y, prior, noise_rows))

    evidence = float(_on(model.log_evidence(), device))
    assert abs(evidence - brute) <= REL * abs(brute)
    model.train()
    lik.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    via_mll = float(_on(mll(model(xd), yd), device)) * y.numel()
    assert abs(via_mll - brute) <= REL * abs(brute)

    model.eval()
    lik.eval()
    with torch.no_grad():
        f = model(x_test.to(device))
        mean, cov, var = _on(f.mean, device), _on(f.covariance_matrix, device), _on(f.variance, device)
        pred_var = _on(lik(f).variance, device)
    want_mean, want_cov = _gp_posterior(net, x, y, x_test, prior, noise_rows)
    assert rel_err(cov, want_cov) <= REL
    assert rel_err(var.reshape(-1), want_cov.diagonal()) <= REL
    assert rel_err(pred_var.reshape(-1), want_cov.diagonal() + noise_rows[: want_cov.shape[0]]) <= REL
    assert rel_err(mean.reshape(-1), want_mean) <= REL
    with torch.no_grad():  # at a MAP the posterior mean is the network's output (test_against_truth.py)
        assert rel_err(mean.reshape(-1), net(x_test).reshape(-1)) <= 1e-7


# --------------------------------------------------------------------- 2. evidence gradients
@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_evidence_gradients_are_exact(device: torch.device, solver: str) -> None:
    net, x, y, _, _, _ = _regression_case(1)
    lik = _gaussian_likelihood(1, NOISE, device)
    xd, yd = x.to(device), y.to(device)
    model = ntkgp.LinearizedGP(_to(net, device), lik, xd, yd, prior_precision=torch.tensor(PER_TENSOR), solver=solver)
    model.train()
    lik.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    (mll(model(xd), yd) * x.shape[0]).backward()
    raw_delta, raw_noise = model.covar_module.raw_prior_precision, lik.noise_covar.raw_noise
    got_delta, got_noise = _on(raw_delta.grad, device), _on(raw_noise.grad, device)

    delta = _on(model.prior_precision, device).clone().requires_grad_(True)
    noise = _on(lik.noise, device).reshape(()).clone().requires_grad_(True)
    prior = torch.cat([d.expand(n) for d, n in zip(delta, model.network.numels)])
    brute = truth.log_evidence(net, x, y, prior, noise.expand(x.shape[0]))
    g_delta, g_noise = torch.autograd.grad(brute, (delta, noise))
    # chain rule through the positivity transforms (softplus), evaluated on the CPU
    d_delta = torch.sigmoid(raw_delta.detach().cpu())
    d_noise = torch.sigmoid(raw_noise.detach().cpu()).reshape(-1)
    assert rel_err(got_delta, g_delta * d_delta) <= 1e-8
    assert rel_err(got_noise.reshape(-1), (g_noise * d_noise).reshape(-1)) <= 1e-8


# ------------------------------------------------------------------------ 3. GPyTorch loop
def test_gpytorch_training_loop(device: torch.device) -> None:
    net, x, y, x_test, _, _ = _regression_case(1)
    net_d = _to(net, device)
    before = {k: v.detach().clone() for k, v in net_d.state_dict().items()}
    lik = _gaussian_likelihood(1, 0.3, device)
    xd, yd = x.to(device), y.to(device)
    model = ntkgp.LinearizedGP(net_d, lik, xd, yd, prior_precision=torch.ones(4))
    network_ids = {id(p) for p in net_d.parameters()}
    params = list(model.parameters())
    assert params and not network_ids & {id(p) for p in params}
    start = [p.detach().clone() for p in params]
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    opt = torch.optim.Adam(params, lr=0.1)
    model.train()
    lik.train()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = -mll(model(xd), yd)
        loss.backward()
        for p in params:
            assert p.device.type == device.type and p.grad.device.type == device.type
            assert torch.isfinite(p.grad).all()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p.detach(), s) for p, s in zip(params, start))  # every hyperparameter moved
    assert all(p.device.type == device.type for p in list(model.parameters()) + list(lik.parameters()))
    after = net_d.state_dict()
    assert all(after[k].device.type == device.type and torch.equal(after[k], v) for k, v in before.items())
    # the evidence at the learned hyperparameters is still the exact one
    delta, noise = _on(model.prior_precision, device), _on(lik.noise, device).reshape(())
    prior = torch.cat([d.expand(n) for d, n in zip(delta, model.network.numels)])
    noise_rows = noise.expand(x.shape[0]).clone()
    brute = float(truth.log_evidence(net, x, y, prior, noise_rows))
    assert abs(float(_on(model.log_evidence(), device)) - brute) <= REL * abs(brute)
    model.eval()
    lik.eval()
    with torch.no_grad():
        pred = lik(model(x_test.to(device)))
    want = _gp_posterior(net, x, y, x_test, prior, noise_rows)[1].diagonal() + noise
    assert rel_err(_on(pred.variance, device), want) <= REL


# ----------------------------------------------------------------- 4. the Laplace likelihoods
@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_softmax_laplace_matches_brute_force(device: torch.device, solver: str) -> None:
    net, x, y, x_test, prior, grad, hessians, log_lik = _softmax_case()
    assert grad < 1e-8
    lik = SoftmaxLikelihood(num_classes=3)
    xd, yd = x.to(device), y.to(device)
    net_d = _to(net, device)
    model = ntkgp.LinearizedGP(net_d, lik, xd, yd, prior_precision=torch.tensor(PER_TENSOR), solver=solver)
    assert model.solver.name == solver
    brute_evidence, brute_cov = truth.ggn_laplace(net, x, x_test, hessians, prior, log_lik)
    brute = float(brute_evidence)
    assert abs(float(_on(model.log_evidence(), device)) - brute) <= REL * abs(brute)
    model.train()
    mll = ntkgp.mlls.LaplaceMarginalLogLikelihood(lik, model)
    assert abs(float(_on(mll(model(xd), yd), device)) * x.shape[0] - brute) <= REL * abs(brute)
    model.eval()
    with torch.no_grad():
        f = model(x_test.to(device))
        cov = _on(f.covariance_matrix, device)
        mean = _on(f.mean, device)
        probs = _on(lik(f).probs, device)
        net_out = net(x_test)
    assert rel_err(cov, brute_cov) <= REL
    assert torch.allclose(mean, net_out, rtol=1e-12, atol=1e-12)  # the Laplace mean is the MAP output
    expected = torch.softmax(net_out / torch.sqrt(1 + math.pi / 8 * brute_cov.diagonal().reshape(6, 3)), -1)
    assert torch.allclose(probs, expected, rtol=1e-9, atol=1e-12)  # probit link from the brute-force variances


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_natural_gaussian_laplace_matches_brute_force(device: torch.device, solver: str) -> None:
    net, x, y, x_test, prior, hessians, log_lik = _natural_case()
    lik = NaturalGaussianLikelihood()
    model = ntkgp.LinearizedGP(_to(net, device), lik, x.to(device), y.to(device), prior_precision=1.0, solver=solver)
    assert model.solver.name == solver
    brute_evidence, brute_cov = truth.ggn_laplace(net, x, x_test, hessians, prior, log_lik)
    brute = float(brute_evidence)
    assert abs(float(_on(model.log_evidence(), device)) - brute) <= REL * abs(brute)
    model.eval()
    with torch.no_grad():
        f = model(x_test.to(device))
        cov = _on(f.covariance_matrix, device)
        pred = lik(f)
    assert torch.allclose(cov, brute_cov, rtol=1e-9, atol=1e-12 * brute_cov.abs().max())
    variance, aleatoric, epistemic = (
        _on(t, device) for t in (pred.variance, pred.aleatoric_variance, pred.epistemic_variance)
    )
    assert torch.allclose(variance, aleatoric + epistemic)
    # the delta-method epistemic variance, written out from the brute-force latent blocks
    with torch.no_grad():
        eta = net(x_test)
    blocks = brute_cov.reshape(7, 2, 7, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    grad_mu = torch.stack([-1 / (2 * eta[:, 1]), eta[:, 0] / (2 * eta[:, 1].square())], -1)
    want = torch.einsum("ni,nij,nj->n", grad_mu, blocks, grad_mu)
    assert torch.allclose(epistemic, want, rtol=1e-9, atol=0)


# ---------------------------------------------------------------- 5. approximate solvers
@cache
def _inducing_problem(c: int):
    x, y = truth.toy_regression(50, 3, c, seed=1)
    x_test, _ = truth.toy_regression(7, 3, c, seed=2)
    net = truth.mlp(3, 16, c, seed=3)  # the GP algebra holds at any weights: no MAP needed
    return net.eval(), x, y, x_test


def _inducing_truth(net, x, y, x_test, prior, idx, noise):
    """Collapsed bound, SGPR mean and covariance, and the subset-of-regressors covariance, densely."""
    return truth.sgpr(net, x, y, x_test, prior, idx, noise, JITTER)


@pytest.mark.parametrize(
    ("c", "spec", "selection"),
    [(1, PER_TENSOR, "indices"), (2, 2.0, "indices"), (1, 2.0, "kmeans"), (1, 2.0, "random")],
)
def test_inducing_matches_dense_truth(device: torch.device, c: int, spec, selection: str) -> None:
    """SGPR bound, mean and covariance, and ``prior_residual=False`` (subset of regressors), with
    given indices or points chosen by a seeded CPU generator (the same points on every device)."""
    net, x, y, x_test = _inducing_problem(c)
    prior = truth.prior_vector(net, spec)
    spec_t = torch.tensor(spec, dtype=F64) if isinstance(spec, list) else spec
    if selection == "indices":
        chosen, expected = torch.tensor([1, 4, 9, 15, 22, 30, 31, 40, 47]), None
    else:
        chosen = selection
        make = kmeans_points if selection == "kmeans" else random_points
        expected = make(x if selection == "kmeans" else 50, 9, torch.Generator().manual_seed(0))
    models = []
    for residual in (True, False):
        solver = Inducing(
            num_inducing=9,
            selection=chosen,
            jitter=JITTER,
            prior_residual=residual,
            generator=torch.Generator().manual_seed(0),
        )
        lik = _gaussian_likelihood(c, NOISE, device)
        models.append(
            ntkgp.LinearizedGP(_to(net, device), lik, x.to(device), y.to(device), prior_precision=spec_t, solver=solver)
        )
    sgpr, sor = models
    idx = sgpr.solver.indices.cpu()
    if expected is not None:
        assert torch.equal(idx, expected) and torch.equal(sor.solver.indices.cpu(), expected)
    noise = _noise_rows(sgpr.likelihood, c, 1)
    bound, mean, cov, sor_cov = _inducing_truth(net, x, y, x_test, prior, idx, noise)
    evidence = _on(sgpr.log_evidence(), device)
    assert torch.allclose(evidence, bound, rtol=1e-8, atol=0)
    assert torch.equal(_on(sor.log_evidence(), device), evidence)  # only the predictive differs
    sgpr.eval()
    sor.eval()
    with torch.no_grad():
        post, sor_post = sgpr(x_test.to(device)), sor(x_test.to(device))
        got_mean, got_cov = _on(post.mean, device).reshape(-1), _on(post.covariance_matrix, device)
        got_var = _on(post.variance, device).reshape(-1)
        sor_mean, sor_got = _on(sor_post.mean, device).reshape(-1), _on(sor_post.covariance_matrix, device)
        sor_var = _on(sor_post.variance, device).reshape(-1)
    assert torch.allclose(got_mean, mean, rtol=1e-7, atol=1e-9)
    assert torch.allclose(got_cov, cov, rtol=1e-6, atol=1e-9 * cov.diagonal().max())
    assert torch.allclose(got_var, cov.diagonal(), rtol=1e-6, atol=0)
    assert torch.allclose(sor_mean, got_mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(sor_got, sor_cov, rtol=1e-6, atol=1e-9 * sor_cov.diagonal().max())
    assert torch.allclose(sor_var, sor_cov.diagonal(), rtol=1e-6, atol=0)


def test_inducing_softmax_laplace_matches_dense_truth(device: torch.device) -> None:
    net, x, y, x_test, prior, _, hessians, log_lik = _softmax_case()
    idx = torch.tensor([2, 5, 11, 17, 23, 29])
    lik = SoftmaxLikelihood(num_classes=3)
    model = ntkgp.LinearizedGP(
        _to(net, device),
        lik,
        x.to(device),
        y.to(device),
        prior_precision=torch.tensor(PER_TENSOR),
        solver=Inducing(selection=idx, jitter=JITTER),
    )
    j, js = truth.jacobian(net, x), truth.jacobian(net, x_test)
    with torch.no_grad():
        f = net(x)
    p = torch.softmax(f, -1)
    b = torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)  # B B^T = diag(p) - p p^T
    assert torch.allclose(b @ b.mT, hessians, rtol=0, atol=1e-12)
    lam, bdiag = torch.block_diag(*hessians), torch.block_diag(*b)
    var = 1 / prior
    rows = truth.point_rows(idx, 3)
    kxz = j @ (var[:, None] * j[rows].T)
    kzz = kxz[rows] + JITTER * kxz[rows].diagonal().mean() * torch.eye(len(rows), dtype=F64)
    k = j @ (var[:, None] * j.T)
    q = kxz @ torch.linalg.solve(kzz, kxz.T)
    log_det = torch.logdet(torch.eye(k.shape[0], dtype=F64) + bdiag.T @ q @ bdiag) + torch.trace(
        bdiag.T @ (k - q) @ bdiag
    )
    expected = log_lik - 0.5 * (prior * truth.flat_params(net).square()).sum() - 0.5 * log_det
    assert torch.allclose(_on(model.log_evidence(), device), expected, rtol=1e-8, atol=0)
    d = kzz + kxz.T @ lam @ kxz
    ksz = js @ (var[:, None] * j[rows].T)
    cov = js @ (var[:, None] * js.T) - ksz @ (torch.linalg.solve(kzz, ksz.T) - torch.linalg.solve(d, ksz.T))
    model.eval()
    with torch.no_grad():
        got = _on(model(x_test.to(device)).covariance_matrix, device)
    assert torch.allclose(got, cov, rtol=1e-6, atol=1e-9 * cov.diagonal().max())


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("selection", ["indices", "random"])
def test_subset_of_data_matches_the_dense_subset_gp(device: torch.device, rescale: bool, selection: str) -> None:
    net, x, y, x_test, prior, _ = _regression_case(1)
    n = x.shape[0]
    if selection == "indices":
        spec = SubsetOfData(indices=torch.tensor([0, 3, 4, 10, 17, 22, 29, 31, 38]), rescale_prior=rescale)
        idx = spec.indices
    else:
        spec = SubsetOfData(num_points=9, rescale_prior=rescale, generator=torch.Generator().manual_seed(0))
        idx = random_points(n, 9, torch.Generator().manual_seed(0))
    m = idx.numel()
    lik = _gaussian_likelihood(1, NOISE, device)
    model = ntkgp.LinearizedGP(
        _to(net, device), lik, x.to(device), y.to(device), prior_precision=torch.tensor(PER_TENSOR), solver=spec
    )
    assert torch.equal(model.solver.indices.cpu(), idx)
    scale = n / m if rescale else 1.0
    noise_rows = _noise_rows(lik, 1, m)
    # the subset's exact evidence at prior * scale, times N / M
    brute = (n / m) * float(truth.log_evidence(net, x[idx], y[idx], prior * scale, noise_rows))
    assert abs(float(_on(model.log_evidence(), device)) - brute) <= REL * abs(brute)
    model.eval()
    with torch.no_grad():
        f = model(x_test.to(device))
        mean, cov = _on(f.mean, device), _on(f.covariance_matrix, device)
    want_mean, want_cov = _gp_posterior(net, x[idx], y[idx], x_test, prior * scale, noise_rows)
    assert rel_err(cov, want_cov) <= REL
    assert rel_err(mean, want_mean) <= REL


def test_subset_of_data_softmax_matches_brute_force(device: torch.device) -> None:
    net, x, y, x_test, prior, _, hessians, log_lik = _softmax_case()
    idx = torch.arange(0, 30, 3)
    n, m = 30, idx.numel()
    model = ntkgp.LinearizedGP(
        _to(net, device),
        SoftmaxLikelihood(num_classes=3),
        x.to(device),
        y.to(device),
        prior_precision=torch.tensor(PER_TENSOR),
        solver=SubsetOfData(indices=idx),
    )
    scaled = prior * n / m
    j = truth.jacobian(net, x[idx])
    log_det = torch.logdet(j.T @ torch.block_diag(*hessians[idx]) @ j + torch.diag(scaled)) - scaled.log().sum()
    expected = float(log_lik - 0.5 * (prior * truth.flat_params(net).square()).sum() - 0.5 * (n / m) * log_det)
    assert abs(float(_on(model.log_evidence(), device)) - expected) <= REL * abs(expected)
    _, want_cov = truth.ggn_laplace(net, x[idx], x_test, hessians[idx], scaled, log_lik)
    model.eval()
    with torch.no_grad():
        cov = _on(model(x_test.to(device)).covariance_matrix, device)
    assert rel_err(cov, want_cov) <= REL


@cache
def _cg_problem():
    x, y = truth.toy_regression(40, 3, seed=21)
    x_test, _ = truth.toy_regression(7, 3, seed=22)
    net = truth.mlp(3, 16, 1, seed=23).eval()  # P = 81 > N = 40
    return net, x, y, x_test


@pytest.mark.parametrize("probes", ["basis", "rademacher"])
def test_conjugate_gradients_match_dense_truth(device: torch.device, probes: str) -> None:
    net, x, y, x_test = _cg_problem()
    lik = _gaussian_likelihood(1, 0.05, device)
    spec = ConjugateGradients(probes=probes, preconditioner_rank=5)
    model = ntkgp.LinearizedGP(
        _to(net, device), lik, x.to(device), y.to(device), prior_precision=torch.tensor(PER_TENSOR), solver=spec
    )
    prior = truth.prior_vector(net, PER_TENSOR)
    noise_rows = _noise_rows(lik, 1, x.shape[0])
    brute = float(truth.log_evidence(net, x, y, prior, noise_rows))
    evidence = float(_on(model.log_evidence(), device))
    info = model.solver.last_info
    assert info.converged
    if probes == "basis":  # deterministic and exact log-determinant (test_conjugate_gradients.py: 1e-6)
        assert abs(evidence - brute) <= 1e-6 * abs(brute)
    else:  # evidence = -(inv_quad + logdet + ...) / 2: within 4 standard errors of the SLQ estimate
        assert 0 < float(info.logdet_std_error) and abs(evidence - brute) < 4 * float(info.logdet_std_error) / 2 + 1e-6
    model.eval()
    with torch.no_grad():
        f = model(x_test.to(device))
        mean, cov = _on(f.mean, device), _on(f.covariance_matrix, device)
    want_mean, want_cov = _gp_posterior(net, x, y, x_test, prior, noise_rows)
    assert model.solver.last_info.variance_rank == x.shape[0]  # the full Lanczos basis: exact variances
    assert rel_norm(mean, want_mean) < 1e-8
    assert rel_norm(cov, want_cov) < 1e-8


def test_conjugate_gradients_evidence_gradients(device: torch.device) -> None:
    """Basis probes: the gradients of inv_quad and log-det equal autograd through the dense truth."""
    net, x, y, _ = _cg_problem()
    lik = _gaussian_likelihood(1, 0.05, device)
    model = ntkgp.LinearizedGP(
        _to(net, device),
        lik,
        x.to(device),
        y.to(device),
        prior_precision=torch.tensor(PER_TENSOR),
        solver=ConjugateGradients(probes="basis", preconditioner_rank=5),
    )
    model.log_evidence().backward()
    got_delta = _on(model.covar_module.raw_prior_precision.grad, device)
    got_noise = _on(lik.noise_covar.raw_noise.grad, device).reshape(-1)
    delta = torch.tensor(PER_TENSOR, dtype=F64, requires_grad=True)
    noise = lik.noise.detach().cpu().reshape(()).clone().requires_grad_(True)
    prior = torch.cat([d.expand(p.numel()) for d, p in zip(delta, net.parameters())])
    brute = truth.log_evidence(net, x, y, prior, noise.expand(x.shape[0]))
    g_delta, g_noise = torch.autograd.grad(brute, (delta, noise))
    d_delta = torch.sigmoid(model.covar_module.raw_prior_precision.detach().cpu())
    d_noise = torch.sigmoid(lik.noise_covar.raw_noise.detach().cpu()).reshape(-1)
    # test_conjugate_gradients.py: 1e-7 against the exact solver, per term
    assert rel_norm(got_delta, g_delta * d_delta) < 1e-7
    assert rel_norm(got_noise, g_noise * d_noise) < 1e-7


@cache
def _lanczos_problem():
    x, y = truth.toy_regression(30, 3, 1, seed=1)
    net = truth.mlp(3, 8, 1, seed=2).eval()  # P = 41 > N = 30
    x_test = torch.randn(7, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    return net, x, y, x_test


def test_lanczos_matches_dense_truth(device: torch.device) -> None:
    net, x, y, x_test = _lanczos_problem()
    prior = truth.prior_vector(net, PER_TENSOR)
    models = {}
    for name, spec in [("full", Lanczos(rank=30, block_size=8)), ("low", Lanczos(rank=10, block_size=3, num_steps=8))]:
        lik = _gaussian_likelihood(1, 0.05, device)
        models[name] = ntkgp.LinearizedGP(
            _to(net, device), lik, x.to(device), y.to(device), prior_precision=torch.tensor(PER_TENSOR), solver=spec
        )
    noise_rows = _noise_rows(models["full"].likelihood, 1, x.shape[0])
    # full rank (k = N C): the exact GP
    full = models["full"]
    brute = float(truth.log_evidence(net, x, y, prior, noise_rows))
    assert abs(float(_on(full.log_evidence(), device)) - brute) <= REL * abs(brute)
    want_mean, want_cov = _gp_posterior(net, x, y, x_test, prior, noise_rows)
    post = full.eval().posterior()
    scale = float(want_cov.diagonal().max())  # test_lanczos.py: 1e-9 of the prior scale; this is smaller
    assert torch.allclose(_on(post.mean(x_test.to(device)), device).reshape(-1), want_mean, rtol=0, atol=1e-9 * scale)
    assert torch.allclose(_on(post.covariance(x_test.to(device)), device), want_cov, rtol=0, atol=1e-9 * scale)
    # rank 10: the top eigenvalues of the dense kernel
    j = truth.jacobian(net, x)
    eigenvalues = torch.linalg.eigvalsh(j @ (j / prior).T).flip(0)
    low = models["low"]
    delta = low.prior_precision.detach()
    got = _on(low.solver.decomposition(delta).eigenvalues(delta), device)
    assert torch.allclose(got, eigenvalues[:10], rtol=1e-8, atol=0)


def test_lanczos_softmax_full_rank_is_exact(device: torch.device) -> None:
    net, x, y, x_test, prior, _, hessians, log_lik = _softmax_case()
    evidence, covariance = truth.ggn_laplace(net, x, x_test, hessians, prior, log_lik)
    model = ntkgp.LinearizedGP(
        _to(net, device),
        SoftmaxLikelihood(num_classes=3),
        x.to(device),
        y.to(device),
        prior_precision=torch.tensor(PER_TENSOR),
        solver=Lanczos(rank=90, block_size=16),
    )
    assert abs(float(_on(model.log_evidence(), device)) - float(evidence)) <= REL * abs(float(evidence))
    post = model.eval().posterior()
    scale = float(covariance.diagonal().max())
    assert torch.allclose(_on(post.covariance(x_test.to(device)), device), covariance, rtol=0, atol=1e-9 * scale)


# ------------------------------------------------------------------- 6. structured Grams
def _structured_nets() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 6),
        nn.Tanh(),
        nn.Linear(6, 2),
    )
    cnn(torch.randn(16, 1, 6, 6))  # BatchNorm running statistics, then eval
    mlp_bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    mlp_bn(torch.randn(16, 4))
    return {"cnn_batchnorm": (cnn.double().eval(), (1, 6, 6)), "mlp_batchnorm": (mlp_bn.double().eval(), (4,))}


@pytest.mark.parametrize(
    ("name", "route"),
    [("cnn_batchnorm", "auto"), ("cnn_batchnorm", "gradient"), ("cnn_batchnorm", "spatial"), ("mlp_batchnorm", "auto")],
)
def test_structured_gram_equals_generic_and_brute_force(device: torch.device, name: str, route: str) -> None:
    """Structured (captured inputs and cotangents) and generic (per-example Jacobians) Grams, both
    contraction orders at many positions, BatchNorm in eval mode (its affine parameters structured too)."""
    net, shape = _structured_nets()[name]
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(7, *shape, generator=gen, dtype=F64)
    x2 = torch.randn(5, *shape, generator=gen, dtype=F64)
    net_d = _to(net, device)
    spec = torch.linspace(0.5, 2.0, len(list(net.parameters())))
    fast, a1 = make_ntk(net_d, x1.to(device), spec, budget=2**20, conv_route=route)
    slow, _ = make_ntk(net_d, x1.to(device), spec, budget=2**20, implementation="generic")
    kinds = {(unit.kind, unit.positions > 1) for unit in fast.plan().units}
    assert kinds == (
        {("dense", True), ("affine", True), ("dense", False)}
        if name == "cnn_batchnorm"
        else {("dense", False), ("affine", False)}
    )
    assert fast.plan().generic == ()
    a2 = fast.network.inputs(x2.to(device))
    layout = fast.layout
    j1, j2 = truth.jacobian(net, x1), truth.jacobian(net, x2)
    prior = layout.expand(layout.initial_precision)
    weights = layout.initial_precision.reciprocal()
    for a, b, ja, jb in [(a1, None, j1, j1), (a1, a2, j1, j2)]:
        k_fast = _on(gram(fast, a, b), device)
        k_slow = _on(gram(slow, a, b), device)
        assert torch.allclose(k_fast, k_slow, rtol=1e-12, atol=1e-13 * k_slow.abs().max())
        expected = (ja / prior) @ jb.T
        k = layout.weighted(weights, k_fast)
        assert torch.allclose(k, expected, rtol=1e-11, atol=1e-13 * expected.abs().max())
    diagonal = weights @ _on(gram_diagonal(fast, a1), device)
    assert torch.allclose(diagonal, ((j1 / prior) * j1).sum(-1), rtol=1e-12)


def test_cnn_gp_evidence_matches_brute_force(device: torch.device) -> None:
    """End to end through the structured conv route: the kernel-space evidence of a small CNN."""
    net, shape = _structured_nets()["cnn_batchnorm"]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(15, *shape, generator=gen, dtype=F64)
    y = torch.randn(15, 2, generator=gen, dtype=F64)
    lik = _gaussian_likelihood(2, NOISE, device)
    model = ntkgp.LinearizedGP(_to(net, device), lik, x.to(device), y.to(device), prior_precision=2.0, solver="kernel")
    noise_rows = _noise_rows(lik, 2, 15)
    brute = float(truth.log_evidence(net, x, y, truth.prior_vector(net, 2.0), noise_rows))
    assert abs(float(_on(model.log_evidence(), device)) - brute) <= REL * abs(brute)


# -------------------------------------------------------------------------------- 7. marglik
@cache
def _marglik_regression():
    x, y = truth.toy_regression(40, 3, seed=41)
    net = truth.mlp(3, 8, 1, seed=42)
    prior = truth.prior_vector(net, PER_TENSOR)
    truth.train_map(net, x, y, prior, 0.04)
    return net.eval(), x, y, prior


def _subset_bound_truth(
    net: nn.Module, x: Tensor, parts: list[Tensor], prior: Tensor, base: Tensor, curvature
) -> Tensor:
    """``base`` - 1/2 sum_s [log|J_s^T Lambda_s J_s + P0| - log|P0|]: block-diagonal Laplace log-dets."""
    out = base
    for p in parts:
        j = truth.jacobian(net, x[p])
        out = out - 0.5 * (torch.logdet(j.T @ curvature(p) @ j + torch.diag(prior)) - prior.log().sum())
    return out


def test_subset_bound_random_partition_matches_brute_force(device: torch.device) -> None:
    net, x, y, prior = _marglik_regression()
    lik = _gaussian_likelihood(1, 0.04, device)
    model = ntkgp.LinearizedGP(
        _to(net, device), lik, x.to(device), y.to(device), prior_precision=torch.tensor(PER_TENSOR)
    )
    parts = random_partition(40, 12, generator=torch.Generator().manual_seed(1))
    bound = SubsetEvidenceBound(model, parts)
    value = _on(bound(), device)
    noise = float(lik.noise.detach().cpu())
    with torch.no_grad():
        r = y - net(x)[:, 0]
    base = (
        -0.5 * (r.square() / noise + math.log(2 * math.pi * noise)).sum()
        - 0.5 * (prior * truth.flat_params(net).square()).sum()
    )
    expected = _subset_bound_truth(net, x, parts, prior, base, lambda p: torch.eye(len(p), dtype=F64) / noise)
    assert abs(float(value - expected)) <= REL * abs(float(expected))
    one = _on(SubsetEvidenceBound(model, [torch.arange(40)])(), device)  # one subset: the Laplace evidence
    laplace = truth.laplace_evidence(net, x, y, prior, torch.full((40,), noise, dtype=F64))
    assert abs(float(one - laplace)) <= REL * abs(float(laplace))
    estimates = torch.stack([_on(bound.minibatch(i), device) for i in range(bound.num_subsets)])
    assert torch.allclose(estimates.mean(), value, rtol=1e-12)  # unbiased minibatches
    gen = torch.Generator().manual_seed(3)  # a CPU generator draws the subset for device tensors
    assert torch.isfinite(_on(bound.minibatch(generator=gen), device))


def test_subset_bound_class_partition_matches_brute_force(device: torch.device) -> None:
    net, x, y, _, prior, _, hessians, log_lik = _softmax_case()
    model = ntkgp.LinearizedGP(
        _to(net, device),
        SoftmaxLikelihood(num_classes=3),
        x.to(device),
        y.to(device),
        prior_precision=torch.tensor(PER_TENSOR),
    )
    parts = class_partition(model.train_targets, 9, generator=torch.Generator().manual_seed(2))
    cpu_parts = class_partition(y, 9, generator=torch.Generator().manual_seed(2))
    assert len(parts) == len(cpu_parts) and all(torch.equal(a.cpu(), b) for a, b in zip(parts, cpu_parts))
    value = _on(SubsetEvidenceBound(model, parts)(), device)
    base = log_lik - 0.5 * (prior * truth.flat_params(net).square()).sum()
    expected = _subset_bound_truth(net, x, parts, prior, base, lambda p: torch.block_diag(*hessians[p]))
    assert abs(float(value - expected)) <= REL * abs(float(expected))


@pytest.mark.parametrize("subset_size", [None, 10])
def test_marglik_tuner_step_matches_brute_force(device: torch.device, subset_size: int | None) -> None:
    """Before and after one step, the reported evidence (or subset bound) is the brute-force one at the
    tuner's hyperparameters."""
    net, x, y, _ = _marglik_regression()
    net_d = _to(net, device)
    lik = _gaussian_likelihood(1, 0.04, device)
    tuner = ntkgp.marglik.MarglikTuner(
        net_d,
        lik,
        x.to(device),
        y.to(device),
        prior_precision=torch.tensor(PER_TENSOR),
        steps=3,
        subset_size=subset_size,
        generator=torch.Generator().manual_seed(0),
    )
    assert tuner.raw_prior_precision.device.type == device.type
    start = (tuner.prior_precision.detach().cpu().clone(), lik.noise.detach().cpu().reshape(()).clone())
    record = tuner.step(net_d)
    end = (_on(tuner.prior_precision, device), _on(lik.noise, device).reshape(()))
    assert not torch.equal(start[0], end[0]) and not torch.equal(start[1], end[1])
    assert all(p.device.type == device.type for p in [tuner.raw_prior_precision, *lik.parameters()])
    parts = None
    if subset_size is not None:  # the tuner's partition, drawn again from the same seed
        parts = random_partition(40, subset_size, generator=torch.Generator().manual_seed(0))

    def evidence(delta: Tensor, noise: Tensor) -> float:
        prior = torch.cat([d.expand(p.numel()) for d, p in zip(delta, net.parameters())])
        if parts is None:
            return float(truth.log_evidence(net, x, y, prior, noise.expand(40)))
        with torch.no_grad():
            r = y - net(x)[:, 0]
        base = (
            -0.5 * (r.square() / noise + torch.log(2 * math.pi * noise)).sum()
            - 0.5 * (prior * truth.flat_params(net).square()).sum()
        )
        return float(_subset_bound_truth(net, x, parts, prior, base, lambda p: torch.eye(len(p), dtype=F64) / noise))

    for key, (delta, noise) in [("log_evidence_before", start), ("log_evidence_after", end)]:
        want = evidence(delta, noise)
        assert abs(record[key] - want) <= REL * abs(want), key
    assert record["log_evidence_after"] > record["log_evidence_before"]
    assert torch.equal(torch.tensor(record["prior_precision"], dtype=F64), end[0])


@pytest.mark.parametrize("subset_size", [None, 10])
def test_fit_online_marglik_runs_on_the_device(device: torch.device, subset_size: int | None) -> None:
    x, y = truth.toy_regression(40, 3, seed=51)
    net = truth.mlp(3, 8, 1, seed=52).to(device)
    lik = _gaussian_likelihood(1, 0.5, device)
    result = ntkgp.marglik.fit_online_marglik(
        net,
        lik,
        x.to(device),
        y.to(device),
        prior_precision=1.0,
        epochs=7,
        lr=1e-2,
        batch_size=16,
        marglik_every=2,
        burnin=2,
        steps=3,
        hyper_lr=0.2,
        progress=False,
        subset_size=subset_size,
        generator=torch.Generator().manual_seed(0),
    )
    marglik = [r for r in result.history if "log_evidence_after" in r]
    assert len(result.history) == 7 and len(marglik) == 3  # epochs 2, 4, 6
    assert all(p.device.type == device.type for p in net.parameters())
    delta = _on(result.prior_precision, device)
    noise = _on(lik.noise, device).reshape(())
    assert abs(float(delta) - 1.0) > 1e-3 and abs(float(noise) - 0.5) > 1e-3
    if subset_size is None:  # the last step was at the last epoch: its evidence is that of the final net
        net_cpu = copy.deepcopy(net).cpu().eval()
        want = float(truth.log_evidence(net_cpu, x, y, truth.prior_vector(net_cpu, float(delta)), noise.expand(40)))
        assert abs(marglik[-1]["log_evidence_after"] - want) <= REL * abs(want)
    else:
        assert all(math.isfinite(r["log_evidence_after"]) for r in marglik)


def test_marglik_tuner_softmax_subsets(device: torch.device) -> None:
    """Class-grouped subsets (labels on the device, partition drawn on the CPU), one subset per step."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(60, 2, generator=g, dtype=F64)
    y = (x[:, 0] + 0.3 * torch.randn(60, generator=g, dtype=F64) > 0).long()
    net = truth.mlp(2, 6, 2, seed=10).to(device)
    tuner = ntkgp.marglik.MarglikTuner(
        net,
        SoftmaxLikelihood(num_classes=2),
        x.to(device),
        y.to(device),
        prior_precision=torch.ones(4),
        steps=3,
        subset_size=15,
        minibatch=True,
        generator=torch.Generator().manual_seed(0),
    )
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for epoch in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(net(x.to(device)), y.to(device), reduction="sum") + tuner.prior_penalty(net)
        loss.backward()
        opt.step()
        if epoch % 10 == 9:
            record = tuner.step(net)
            assert record["log_evidence_after"] >= record["log_evidence_before"] - 1e-6
    assert len(tuner.history) == 2
    assert not torch.equal(_on(tuner.prior_precision, device), torch.ones(4, dtype=F64))


# ------------------------------------------------------------------------------ 8. bad input
def test_data_on_another_device_is_refused(device: torch.device) -> None:
    if device.type == "cpu":
        pytest.skip("needs a second device (CUDA) to put the data on")
    net, x, y, x_test, _, _ = _regression_case(1)
    net_d = _to(net, device)
    lik = _gaussian_likelihood(1, NOISE, device)
    with pytest.raises(ValueError, match="train_x is on cpu but the network is on cuda"):
        ntkgp.LinearizedGP(net_d, lik, x, y.to(device))
    with pytest.raises(ValueError, match="train_y is on cpu but the network is on cuda"):
        ntkgp.LinearizedGP(net_d, lik, x.to(device), y)
    with pytest.raises(ValueError, match="train_x is on cuda.* but the network is on cpu"):
        ntkgp.LinearizedGP(net, lik.cpu(), x.to(device), y)
    lik.to(device)
    model = ntkgp.LinearizedGP(net_d, lik, x.to(device), y.to(device)).eval()
    with pytest.raises(ValueError, match="x is on cpu but the network is on cuda"):
        model(x_test)
    softmax_net, sx, sy, *_ = _softmax_case()
    with pytest.raises(ValueError, match="train_y is on cpu but the network is on cuda"):  # labels on the CPU
        ntkgp.LinearizedGP(_to(softmax_net, device), SoftmaxLikelihood(num_classes=3), sx.to(device), sy)
    lik_cpu = _gaussian_likelihood(1, NOISE, torch.device("cpu"))
    with pytest.raises(ValueError, match="the likelihood is on cpu but the network is on cuda"):
        ntkgp.LinearizedGP(net_d, lik_cpu, x.to(device), y.to(device))


@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_random_draws_take_a_generator_on_either_device(device: torch.device, generator_device: str) -> None:
    """Generators draw on their own device; the result goes where the data is. A CPU generator gives
    the same draws on every device."""
    if "cuda" in (device.type, generator_device) and not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def gen() -> torch.Generator:
        return torch.Generator(device=generator_device).manual_seed(3)

    reference = torch.randperm(20, generator=gen(), device=generator_device).cpu()
    assert torch.equal(torch.cat(random_partition(20, 6, generator=gen())), reference)
    labels = (torch.arange(20) % 3).to(device)
    parts = class_partition(labels, 4, generator=gen())
    assert sorted(torch.cat(parts).tolist()) == list(range(20))
    assert all((labels.cpu()[p] == labels.cpu()[p[0]]).sum() >= min(len(p), 2) for p in parts)
    assert torch.equal(random_points(20, 5, gen()), reference[:5].sort().values)
    # Monte Carlo link: draws on the generator's device, the probabilities on the data's
    mean = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]], dtype=torch.float64, device=device)
    cov = 0.3 * torch.eye(3, dtype=torch.float64, device=device).expand(2, 3, 3)
    probs = expected_softmax(mean, cov, "mc", n_samples=20000, generator=gen())
    assert probs.device == mean.device
    cpu_probs = expected_softmax(mean.cpu(), cov.cpu(), "mc", n_samples=20000, generator=gen())
    if generator_device == "cpu":  # the same draws wherever the data is
        assert torch.allclose(probs.cpu(), cpu_probs, rtol=1e-12, atol=0)
    assert (probs.cpu() - expected_softmax(mean.cpu(), cov.cpu(), "probit")).abs().max() < 0.05
    p1 = expected_sigmoid(mean[:, 0], cov[:, 0, 0], "mc", n_samples=20000, generator=gen())
    assert p1.device == mean.device
    # online marglik with the generator shuffling and drawing subsets
    net, x, y, *_ = _softmax_case()
    result = fit_online_marglik(
        _to(net, device),
        SoftmaxLikelihood(num_classes=3),
        x.to(device),
        y.to(device),
        epochs=3,
        burnin=1,
        marglik_every=1,
        steps=1,
        subset_size=10,
        minibatch=True,
        progress=False,
        generator=gen(),
    )
    assert len(result.tuner.history) == 2
