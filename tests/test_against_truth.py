"""LinearizedGP against independent float64 truths: brute-force weight space and laplace-torch.

Contract (issue 2): in float64 on small MLPs trained to a tight MAP, evidence and predictive
(co)variances agree with laplace-torch's FullLaplace to a relative 1e-7, and with brute-force
weight-space algebra, for a scalar prior, a per-tensor prior and C = 2; in both solvers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import gpytorch
import pytest
import torch
import truth
from laplace import Laplace
from laplace.curvature import AsdlGGN
from torch.utils.data import DataLoader, TensorDataset

import ntkgp

REL = 1e-7


@dataclass
class Case:
    net: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    prior_spec: object
    prior: torch.Tensor  # (P,)
    noise: torch.Tensor  # (C,) per output
    grad_norm: float


@cache
def make_case(c: int, prior_kind: str, n: int = 60, hidden: int = 12) -> Case:
    x, y = truth.toy_regression(n, 3, c, seed=1)
    x_test, _ = truth.toy_regression(9, 3, c, seed=2)
    net = truth.mlp(3, hidden, c, seed=3)
    if prior_kind == "scalar":
        spec: object = 2.0
        prior = truth.prior_vector(net, 2.0)
    else:
        per = [0.5, 3.0, 1.5, 4.0]
        spec = torch.tensor(per)
        prior = truth.prior_vector(net, per)
    noise = torch.tensor([0.3**2] * c, dtype=torch.float64)
    grad_norm = truth.train_map(net, x, y, prior, noise)
    net.eval()
    return Case(net, x, y, x_test, spec, prior, noise, grad_norm)


def make_likelihood(noise: torch.Tensor) -> gpytorch.likelihoods.Likelihood:
    if noise.numel() == 1:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
        lik.noise = noise
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=noise.numel(), has_task_noise=False).double()
        lik.noise = noise[0]
    return lik


def fit_laplace(case: Case) -> Laplace:
    # backend=AsdlGGN: laplace-torch 0.3's default CurvlinopsGGN loses precision even in float64
    # (its GGN differs from J^T J by ~3e-8 relative here, the evidence by ~1.7e-7); ASDL's is exact.
    la = Laplace(
        case.net,
        "regression",
        subset_of_weights="all",
        hessian_structure="full",
        sigma_noise=case.noise[0].sqrt(),
        prior_precision=_laplace_prior(case),
        backend=AsdlGGN,
    )
    y = case.y.reshape(case.x.shape[0], -1)
    la.fit(DataLoader(TensorDataset(case.x, y), batch_size=len(case.x)))
    return la


def _laplace_prior(case: Case) -> torch.Tensor:
    # float64 tensors: laplace-torch rounds Python floats through float32 (sigma 0.3 -> 0.30000001)
    return torch.as_tensor(case.prior_spec, dtype=torch.float64).reshape(-1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


CASES = [(1, "scalar"), (1, "per_tensor"), (2, "scalar"), (2, "per_tensor")]


@pytest.mark.parametrize("solver", ["kernel", "weight"])
@pytest.mark.parametrize("c,prior_kind", CASES)
def test_evidence_matches_laplace_and_brute_force(c: int, prior_kind: str, solver: str) -> None:
    case = make_case(c, prior_kind)
    assert case.grad_norm < 1e-8, "the MAP must be tight for the identities to hold"
    lik = make_likelihood(case.noise)
    model = ntkgp.LinearizedGP(case.net, lik, case.x, case.y, prior_precision=case.prior_spec, solver=solver)
    assert model.solver.name == solver
    model.train()
    lik.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    evidence = (mll(model(case.x), case.y) * case.y.numel()).detach()

    noise_rows = case.noise.repeat(case.x.shape[0])
    brute = truth.log_evidence(case.net, case.x, case.y, case.prior, noise_rows)
    weight_space_laplace = truth.laplace_evidence(case.net, case.x, case.y, case.prior, noise_rows)
    peer = fit_laplace(case).log_marginal_likelihood()

    assert abs(float(evidence - brute)) <= REL * abs(float(brute))
    assert abs(float(evidence - weight_space_laplace)) <= REL * abs(float(brute))
    assert abs(float(evidence - peer)) <= REL * abs(float(peer))
    assert abs(float(model.log_evidence() - evidence)) <= 1e-10 * abs(float(evidence))


@pytest.mark.parametrize("solver", ["kernel", "weight"])
@pytest.mark.parametrize("c,prior_kind", CASES)
def test_predictive_covariance_matches_laplace_and_brute_force(c: int, prior_kind: str, solver: str) -> None:
    case = make_case(c, prior_kind)
    lik = make_likelihood(case.noise)
    model = ntkgp.LinearizedGP(case.net, lik, case.x, case.y, prior_precision=case.prior_spec, solver=solver)
    model.eval()
    with torch.no_grad():
        f = model(case.x_test)
        cov = f.covariance_matrix
        var = f.variance
    n_test = case.x_test.shape[0]
    noise_rows = case.noise.repeat(case.x.shape[0])
    j, jt = truth.jacobian(case.net, case.x), truth.jacobian(case.net, case.x_test)
    brute = truth.posterior_covariance(j, jt, case.prior, noise_rows)
    assert rel_err(cov, brute) <= 1e-9
    assert rel_err(var.reshape(-1), brute.diagonal()) <= 1e-9

    la = fit_laplace(case)
    f_mu, f_var = la(case.x_test, pred_type="glm")  # per-point (n, C, C) blocks
    blocks = cov.reshape(n_test, c, n_test, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    assert rel_err(blocks, f_var.detach()) <= REL
    _, joint = la(case.x_test, pred_type="glm", joint=True)
    assert rel_err(cov, joint.detach().reshape(n_test * c, n_test * c)) <= REL
    # at a MAP, the posterior mean of the linearized model is the network's prediction
    with torch.no_grad():
        net_out = case.net(case.x_test).reshape(f.mean.shape)
    assert rel_err(f.mean, net_out) <= 1e-7
    assert rel_err(f.mean.reshape(n_test, c), f_mu.detach().reshape(n_test, c)) <= 1e-7


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_per_output_noise_against_brute_force(solver: str) -> None:
    """MultitaskGaussianLikelihood with task noise: S = diag(s_c) per output, plus global noise."""
    case = make_case(2, "per_tensor")
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2).double()
    lik.task_noises = torch.tensor([0.05, 0.2], dtype=torch.float64)
    lik.noise = torch.tensor(0.01, dtype=torch.float64)
    model = ntkgp.LinearizedGP(case.net, lik, case.x, case.y, prior_precision=case.prior_spec, solver=solver)
    noise_rows = torch.tensor([0.06, 0.21], dtype=torch.float64).repeat(case.x.shape[0])
    brute = truth.log_evidence(case.net, case.x, case.y, case.prior, noise_rows)
    assert abs(float(model.log_evidence() - brute)) <= 1e-9 * abs(float(brute))
    model.eval()
    with torch.no_grad():
        cov = model(case.x_test).covariance_matrix
    j, jt = truth.jacobian(case.net, case.x), truth.jacobian(case.net, case.x_test)
    assert rel_err(cov, truth.posterior_covariance(j, jt, case.prior, noise_rows)) <= 1e-9


def test_module_mapping_prior_against_brute_force() -> None:
    case = make_case(1, "scalar")
    spec = {"0": 0.7, "2": 5.0}  # one precision per Linear module
    prior = truth.prior_vector(case.net, [0.7, 0.7, 5.0, 5.0])
    lik = make_likelihood(case.noise)
    model = ntkgp.LinearizedGP(case.net, lik, case.x, case.y, prior_precision=spec)
    assert model.covar_module.group_names == ("0", "2")
    brute = truth.log_evidence(case.net, case.x, case.y, prior, case.noise.repeat(case.x.shape[0]))
    assert abs(float(model.log_evidence() - brute)) <= 1e-9 * abs(float(brute))


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_evidence_gradients_are_exact(solver: str) -> None:
    """d evidence / d(delta, noise) against autograd through the brute-force evidence."""
    case = make_case(1, "per_tensor")
    lik = make_likelihood(case.noise)
    model = ntkgp.LinearizedGP(case.net, lik, case.x, case.y, prior_precision=case.prior_spec, solver=solver)
    model.train()
    lik.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    (mll(model(case.x), case.y) * case.x.shape[0]).backward()
    raw_delta, raw_noise = model.covar_module.raw_prior_precision, lik.noise_covar.raw_noise

    delta = model.prior_precision.detach().clone().requires_grad_(True)
    noise = lik.noise.detach().clone().reshape(()).requires_grad_(True)
    prior = torch.cat([d.expand(n) for d, n in zip(delta, model.network.numels)])
    brute = truth.log_evidence(case.net, case.x, case.y, prior, noise.expand(case.x.shape[0]))
    g_delta, g_noise = torch.autograd.grad(brute, (delta, noise))
    # chain rule through the positivity transforms
    d_delta = torch.autograd.functional.jacobian(
        model.covar_module.raw_prior_precision_constraint.transform, raw_delta.detach()
    ).diagonal()
    d_noise = torch.autograd.functional.jacobian(
        lik.noise_covar.raw_noise_constraint.transform, raw_noise.detach()
    ).reshape(-1)
    assert rel_err(raw_delta.grad, g_delta * d_delta) <= 1e-8
    assert rel_err(raw_noise.grad.reshape(-1), (g_noise * d_noise).reshape(-1)) <= 1e-8


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_exact_above_gpytorch_cholesky_threshold(solver: str) -> None:
    """N = 1000 > 800: GPyTorch would switch to CG; the exact path must not."""
    x, y = truth.toy_regression(1000, 2, seed=5)
    net = truth.mlp(2, 6, 1, seed=6)
    prior = truth.prior_vector(net, 1.0)
    truth.train_map(net, x, y, prior, 0.01, iters=3)
    net.eval()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.tensor(1e-2, dtype=torch.float64)  # a Python float is rounded through float32
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.0, solver=solver)
    noise_rows = torch.full((1000,), 1e-2, dtype=torch.float64)
    brute = truth.log_evidence(net, x, y, prior, noise_rows)
    model.train()
    lik.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    assert abs(float(mll(model(x), y) * 1000 - brute)) <= 1e-8 * abs(float(brute))
    x_test, _ = truth.toy_regression(20, 2, seed=7)
    model.eval()
    lik.eval()
    with torch.no_grad():
        var = model(x_test).variance
        pred_var = lik(model(x_test)).variance
    j, jt = truth.jacobian(net, x), truth.jacobian(net, x_test)
    brute_var = truth.posterior_covariance(j, jt, prior, noise_rows).diagonal()
    assert rel_err(var, brute_var) <= 1e-8
    assert rel_err(pred_var, brute_var + 1e-2) <= 1e-8


def test_float32_network_variances_within_1e3_of_float64_truth() -> None:
    x, y = truth.toy_regression(300, 8, seed=11, dtype=torch.float32)
    net = truth.mlp(8, 64, 1, depth=2, seed=12, dtype=torch.float32)  # P = 4865 > N: kernel space
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        ((net(x)[:, 0] - y).square().mean()).backward()
        opt.step()
    net.eval()
    x_test, _ = truth.toy_regression(100, 8, seed=13, dtype=torch.float32)
    lik = gpytorch.likelihoods.GaussianLikelihood()
    lik.noise = 1e-3
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.0)
    assert model.solver.name == "kernel"
    model.eval()
    with torch.no_grad():
        var = model(x_test).variance
    net64 = truth.mlp(8, 64, 1, depth=2, seed=12)
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    j, jt = truth.jacobian(net64, x.double()), truth.jacobian(net64, x_test.double())
    prior = truth.prior_vector(net64, 1.0)
    brute = truth.posterior_covariance(j, jt, prior, torch.full((300,), float(lik.noise), dtype=torch.float64))
    assert rel_err(var, brute.diagonal()) <= 1e-3
