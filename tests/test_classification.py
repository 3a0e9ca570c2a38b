"""Classification and heteroscedastic regression (issue 3) against independent truths.

* Softmax: laplace-torch's FullLaplace (``hessian_structure='full'``, ASDL's exact GGN) on small
  MLPs trained to a tight MAP on scikit-learn's digits, wine and breast-cancer data: per-point
  latent covariance blocks and the log marginal likelihood to a relative 1e-7, probit
  probabilities to 1e-6; and a brute-force weight-space GGN Laplace.
* Bernoulli and natural-parameter Gaussian: the brute-force weight-space GGN Laplace, with
  Lambda from autograd Hessians of the per-point negative log-likelihood.
Scalar and per-tensor priors, kernel- and weight-space solvers.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import truth
from laplace import Laplace
from laplace.curvature import AsdlGGN
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ntkgp
from ntkgp.likelihoods import BernoulliLikelihood, NaturalGaussianLikelihood, SoftmaxLikelihood

LOADERS = {"digits": load_digits, "wine": load_wine, "breast_cancer": load_breast_cancer}
PRIORS = {"scalar": 1.5, "per_tensor": [0.5, 2.0, 1.0, 4.0]}


def _data(name: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    data = LOADERS[name]()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]], y[perm[:n]], x[perm[n : n + 15]]


@cache
def softmax_case(name: str, prior_kind: str):
    x, y, x_test = _data(name, 90)
    classes = int(y.max()) + 1
    net = truth.mlp(x.shape[1], 6, classes, seed=4)
    prior = truth.prior_vector(net, PRIORS[prior_kind])
    grad = truth.train_map_loss(net, x, lambda f: F.cross_entropy(f, y, reduction="sum"), prior)
    return net.eval(), x, y, x_test, prior, grad


def _spec(prior_kind: str):
    value = PRIORS[prior_kind]
    return value if isinstance(value, float) else torch.tensor(value, dtype=torch.float64)


@pytest.mark.parametrize("solver", ["kernel", "weight"])
@pytest.mark.parametrize("prior_kind", list(PRIORS))
@pytest.mark.parametrize("name", list(LOADERS))
def test_softmax_matches_full_laplace(name: str, prior_kind: str, solver: str) -> None:
    net, x, y, x_test, prior, grad = softmax_case(name, prior_kind)
    assert grad < 1e-8
    classes = int(y.max()) + 1
    lik = SoftmaxLikelihood(num_classes=classes)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=_spec(prior_kind), solver=solver)
    assert model.solver.name == solver
    model.train()
    mll = ntkgp.mlls.LaplaceMarginalLogLikelihood(lik, model)
    evidence = float(mll(model(x), y)) * x.shape[0]

    la = Laplace(
        net,
        "classification",
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision=torch.as_tensor(PRIORS[prior_kind], dtype=torch.float64).reshape(-1),
        backend=AsdlGGN,
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=len(y)))
    peer = float(la.log_marginal_likelihood())
    assert abs(evidence - peer) <= 1e-7 * abs(peer)

    model.eval()
    lik.eval()
    with torch.no_grad():
        f = model(x_test)
        blocks = f.lazy_covariance_matrix.point_blocks()
        probs = lik(f).probs
    _, peer_blocks = la._glm_predictive_distribution(x_test)
    assert ((blocks - peer_blocks).abs().max() / peer_blocks.abs().max()) <= 1e-7
    peer_probs = la(x_test, pred_type="glm", link_approx="probit")
    assert ((probs - peer_probs).abs().max()) <= 1e-6
    with torch.no_grad():
        assert torch.allclose(f.mean, net(x_test), rtol=0, atol=0)  # Laplace: the mean is the MAP output

    # brute-force weight-space GGN Laplace, Lambda by autograd
    with torch.no_grad():
        out = net(x)
    hessians = truth.nll_hessians(lambda v, n: -torch.log_softmax(v, -1)[y[n]], out)
    log_lik = -F.cross_entropy(out, y, reduction="sum")
    brute_evidence, brute_cov = truth.ggn_laplace(net, x, x_test, hessians, prior, log_lik)
    assert abs(evidence - float(brute_evidence)) <= 1e-9 * abs(float(brute_evidence))
    with torch.no_grad():
        cov = f.covariance_matrix
    assert ((cov - brute_cov).abs().max() / brute_cov.abs().max()) <= 1e-9


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_laplace_evidence_gradients_are_exact(solver: str) -> None:
    """d evidence / d delta (per tensor) against autograd through the brute-force GGN Laplace evidence."""
    net, x, y, x_test, _, _ = softmax_case("wine", "per_tensor")
    model = ntkgp.LinearizedGP(
        net, SoftmaxLikelihood(num_classes=3), x, y, prior_precision=_spec("per_tensor"), solver=solver
    )
    model.log_evidence().backward()
    raw = model.covar_module.raw_prior_precision
    delta = model.prior_precision.detach().clone().requires_grad_(True)
    prior = torch.cat([d.expand(n) for d, n in zip(delta, model.network.numels)])
    with torch.no_grad():
        out = net(x)
    hessians = truth.nll_hessians(lambda v, n: -torch.log_softmax(v, -1)[y[n]], out)
    log_lik = -F.cross_entropy(out, y, reduction="sum")
    brute, _ = truth.ggn_laplace(net, x, x_test, hessians, prior, log_lik)
    (g_delta,) = torch.autograd.grad(brute, delta)
    d_delta = torch.autograd.functional.jacobian(
        model.covar_module.raw_prior_precision_constraint.transform, raw.detach()
    ).diagonal()
    assert ((raw.grad - g_delta * d_delta).abs().max() / (g_delta * d_delta).abs().max()) <= 1e-8


@cache
def bernoulli_case(prior_kind: str):
    x, y, x_test = _data("breast_cancer", 80, seed=1)
    net = truth.mlp(x.shape[1], 5, 1, seed=6)
    prior = truth.prior_vector(net, PRIORS[prior_kind])
    yf = y.to(torch.float64)
    truth.train_map_loss(net, x, lambda f: F.binary_cross_entropy_with_logits(f[:, 0], yf, reduction="sum"), prior)
    return net.eval(), x, y, x_test, prior


@pytest.mark.parametrize("solver", ["kernel", "weight"])
@pytest.mark.parametrize("prior_kind", list(PRIORS))
def test_bernoulli_matches_brute_force(prior_kind: str, solver: str) -> None:
    net, x, y, x_test, prior = bernoulli_case(prior_kind)
    lik = BernoulliLikelihood()
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=_spec(prior_kind), solver=solver)
    with torch.no_grad():
        out = net(x)
    yf = y.to(torch.float64)
    hessians = truth.nll_hessians(lambda v, n: F.binary_cross_entropy_with_logits(v[0], yf[n]), out)
    log_lik = -F.binary_cross_entropy_with_logits(out[:, 0], yf, reduction="sum")
    brute_evidence, brute_cov = truth.ggn_laplace(net, x, x_test, hessians, prior, log_lik)
    assert abs(float(model.log_evidence()) - float(brute_evidence)) <= 1e-9 * abs(float(brute_evidence))
    model.eval()
    with torch.no_grad():
        f = model(x_test)
        p = lik(f).probs
    assert torch.allclose(f.covariance_matrix, brute_cov, rtol=1e-9, atol=1e-12 * brute_cov.abs().max())
    with torch.no_grad():
        mu = net(x_test)[:, 0]
    expected = torch.sigmoid(mu / torch.sqrt(1 + math.pi / 8 * brute_cov.diagonal()))
    assert torch.allclose(p, expected, rtol=1e-9)


class NaturalNet(nn.Module):
    """Outputs natural parameters (eta1, eta2 = -softplus(h)/2) of a heteroscedastic Gaussian."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.stack([h[:, 0], -F.softplus(h[:, 1]) / 2], -1)


@cache
def natural_case():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(70, 1, generator=g, dtype=torch.float64) * 6 - 3
    y = torch.sin(x[:, 0]) + (0.05 + 0.3 * (x[:, 0] > 0)) * torch.randn(70, generator=g, dtype=torch.float64)
    torch.manual_seed(7)
    net = NaturalNet().double()
    prior = truth.prior_vector(net, 1.0)

    def nll(f: torch.Tensor) -> torch.Tensor:
        return -NaturalGaussianLikelihood().log_likelihood(f, y)

    truth.train_map_loss(net, x, nll, prior)
    return net.eval(), x, y, torch.linspace(-4, 4, 9, dtype=torch.float64).unsqueeze(-1), prior


def _gaussian_nll(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mu, var = -v[0] / (2 * v[1]), -1 / (2 * v[1])
    return 0.5 * (y - mu) ** 2 / var + 0.5 * torch.log(2 * math.pi * var)


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_natural_gaussian_matches_brute_force(solver: str) -> None:
    net, x, y, x_test, prior = natural_case()
    lik = NaturalGaussianLikelihood()
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.0, solver=solver)
    with torch.no_grad():
        out = net(x)
    hessians = truth.nll_hessians(lambda v, n: _gaussian_nll(v, y[n]), out)
    log_lik = -sum(_gaussian_nll(out[n], y[n]) for n in range(len(y)))
    brute_evidence, brute_cov = truth.ggn_laplace(net, x, x_test, hessians, prior, log_lik)
    assert abs(float(model.log_evidence()) - float(brute_evidence)) <= 1e-9 * abs(float(brute_evidence))
    model.eval()
    with torch.no_grad():
        f = model(x_test)
    assert torch.allclose(f.covariance_matrix, brute_cov, rtol=1e-9, atol=1e-12 * brute_cov.abs().max())


def test_heteroscedastic_variance_split_on_the_model() -> None:
    net, x, y, x_test, _ = natural_case()
    model = ntkgp.LinearizedGP(net, NaturalGaussianLikelihood(), x, y, prior_precision=1.0).eval()
    with torch.no_grad():
        pred = model.likelihood(model(x_test))
    assert torch.allclose(pred.variance, pred.aleatoric_variance + pred.epistemic_variance)
    assert (pred.epistemic_variance > 0).all() and (pred.aleatoric_variance > 0).all()
    # the aleatoric part follows the noise the data was made with: larger for x > 0
    assert pred.aleatoric_variance[x_test[:, 0] > 1].min() > 1.3 * pred.aleatoric_variance[x_test[:, 0] < -1].max()
    # the epistemic part grows away from the data (x in [-3, 3])
    assert pred.epistemic_variance[-1] > 3 * pred.epistemic_variance[4]


@pytest.mark.parametrize("cv", [0.01, 0.03, 0.1])
def test_delta_moments_against_monte_carlo(cv: float) -> None:
    """Controlled latent Gaussians over eta: the delta method's error must shrink like cv^2.

    (mu(eta) = -eta1 / (2 eta2) is a ratio: where eta2's Gaussian reaches near 0 its moments are
    heavy-tailed, so Monte Carlo is a fair reference only for a concentrated eta2.)
    """
    mu, var = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), torch.tensor([0.5, 0.1, 2.0], dtype=torch.float64)
    mean = torch.stack([mu / var, -1 / (2 * var)], -1)
    sd = cv * mean.abs()
    corr = torch.tensor([[1.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    cov = sd.unsqueeze(-1) * corr * sd.unsqueeze(-2)
    delta = NaturalGaussianLikelihood().predictive(mean, cov)
    mc = NaturalGaussianLikelihood(
        link_approx="mc", n_samples=2_000_000, generator=torch.Generator().manual_seed(0)
    ).predictive(mean, cov)
    for part in ("mean", "aleatoric_variance", "epistemic_variance"):
        a, b = getattr(delta, part), getattr(mc, part)
        scale = b.abs() if part != "mean" else mc.variance.sqrt()
        err = ((a - b).abs() / scale).max()
        assert err < 10 * cv**2 + 5e-3, (part, float(err))


def test_link_approximations() -> None:
    net, x, y, x_test, *_ = softmax_case("wine", "scalar")
    model = ntkgp.LinearizedGP(net, SoftmaxLikelihood(num_classes=3), x, y, prior_precision=1.5).eval()
    with torch.no_grad():
        f = model(x_test)
    mean, blocks = f.mean, f.lazy_covariance_matrix.point_blocks()
    gen = torch.Generator().manual_seed(1)
    mc = SoftmaxLikelihood(num_classes=3, link_approx="mc", n_samples=20_000, generator=gen)(f).probs
    gen.manual_seed(1)
    again = SoftmaxLikelihood(num_classes=3, link_approx="mc", n_samples=20_000, generator=gen)(f).probs
    assert torch.equal(mc, again)  # reproducible with a generator
    for link in ("probit", "bridge", "mc"):
        probs = SoftmaxLikelihood(num_classes=3, link_approx=link)(f).probs
        assert torch.allclose(probs.sum(-1), torch.ones(len(x_test), dtype=probs.dtype))
    # bridge, written out by hand for one point, after projecting onto sum-zero logits
    bridge = SoftmaxLikelihood(num_classes=3, link_approx="bridge")(f).probs
    proj = torch.eye(3, dtype=torch.float64) - 1 / 3
    m, v = proj @ mean[0], (proj @ blocks[0] @ proj).diagonal()
    alpha = (1 - 2 / 3 + m.exp() / 9 * (-m).exp().sum()) / v
    assert torch.allclose(bridge[0], alpha / alpha.sum())
    # like the softmax, the bridge ignores a constant shift of the logits
    shifted = SoftmaxLikelihood(num_classes=3, link_approx="bridge").predictive(mean + 2.5, blocks).probs
    assert torch.allclose(shifted, bridge)
    # vanishing latent variance: probit and MC both become softmax(mean)
    tiny = blocks * 1e-8
    for link in ("probit", "mc"):
        probs = SoftmaxLikelihood(num_classes=3, link_approx=link, generator=gen).predictive(mean, tiny).probs
        assert torch.allclose(probs, torch.softmax(mean, -1), atol=1e-4)


def test_sigmoid_mc_against_quadrature() -> None:
    """E[sigmoid(f)], f ~ N(m, v): MC within 5 standard errors of Gauss-Hermite quadrature."""
    m = torch.tensor([-2.0, 0.3, 1.5], dtype=torch.float64)
    v = torch.tensor([4.0, 0.5, 9.0], dtype=torch.float64)
    nodes, weights = (torch.tensor(a, dtype=torch.float64) for a in np.polynomial.hermite.hermgauss(80))
    values = torch.sigmoid(m.unsqueeze(-1) + (2 * v).sqrt().unsqueeze(-1) * nodes)
    exact = (weights * values).sum(-1) / math.sqrt(math.pi)
    lik = BernoulliLikelihood(link_approx="mc", n_samples=200_000, generator=torch.Generator().manual_seed(0))
    mc = lik.predictive(m.unsqueeze(-1), v.reshape(-1, 1, 1)).probs
    assert ((mc - exact).abs() < 5 * 0.5 / math.sqrt(200_000)).all()
    probit = BernoulliLikelihood().predictive(m.unsqueeze(-1), v.reshape(-1, 1, 1)).probs
    assert ((probit - exact).abs() < 0.02).all()  # MacKay's probit approximation is good to ~1e-2 for sigmoid


def test_adam_moves_prior_precision_to_the_evidence_optimum() -> None:
    net, x, y, *_ = softmax_case("digits", "scalar")
    lik = SoftmaxLikelihood(num_classes=10)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.5)
    grid = torch.logspace(-2, 2, 801, dtype=torch.float64)  # log spacing 0.0115
    with torch.no_grad():
        values = []
        for d in grid:
            model.prior_precision = d
            values.append(float(model.log_evidence()))
    best = float(grid[int(torch.tensor(values).argmax())])
    model.prior_precision = 20.0
    mll = ntkgp.mlls.LaplaceMarginalLogLikelihood(lik, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    for _ in range(400):  # converged to 1e-6 in raw-gradient by ~400 steps from delta = 20
        opt.zero_grad()
        (-mll(model(x), y)).backward()
        opt.step()
    spacing = math.log(float(grid[1] / grid[0]))
    assert abs(math.log(float(model.prior_precision.detach())) - math.log(best)) <= spacing


def test_bad_classification_input() -> None:
    net, x, y, *_ = softmax_case("wine", "scalar")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        ntkgp.LinearizedGP(net, SoftmaxLikelihood(num_classes=3), x, torch.where(y == 2, 5, y))
    with pytest.raises(TypeError, match="integer class labels"):
        ntkgp.LinearizedGP(net, SoftmaxLikelihood(num_classes=3), x, y.double())
    with pytest.raises(ValueError, match="expects 4"):
        ntkgp.LinearizedGP(net, SoftmaxLikelihood(num_classes=4), x, y)
    with pytest.raises(ValueError, match="0 or 1"):
        ntkgp.LinearizedGP(truth.mlp(x.shape[1], 3, 1).eval(), BernoulliLikelihood(), x, y)
    with pytest.raises(ValueError, match="eta2"):
        ntkgp.LinearizedGP(
            truth.mlp(x.shape[1], 3, 2, seed=1).eval(),
            NaturalGaussianLikelihood(),
            x,
            torch.randn(len(y), dtype=torch.float64),
        )
    with pytest.raises(ValueError, match="training targets"):
        model = ntkgp.LinearizedGP(net, SoftmaxLikelihood(num_classes=3), x, y)
        ntkgp.mlls.LaplaceMarginalLogLikelihood(model.likelihood, model)(model(x), y.flip(0))
