"""LinearizedGP inside ordinary GPyTorch loops: training, prediction, state, composition."""

from __future__ import annotations

import copy
import gc
import weakref

import gpytorch
import pytest
import torch
import truth
from torch import nn

import ntkgp


def _regression(c: int = 1, n: int = 40):
    x, y = truth.toy_regression(n, 3, c, seed=31)
    net = truth.mlp(3, 10, c, seed=32).eval()
    truth.train_map(net, x, y, truth.prior_vector(net, 1.0), 0.05, iters=2)
    return net, x, y


def test_adam_over_model_parameters_fits_hyperparameters_and_never_touches_the_net() -> None:
    net, x, y = _regression()
    before = copy.deepcopy(net.state_dict())
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=torch.ones(4))
    names = {n for n, _ in model.named_parameters()}
    assert names == {"covar_module.raw_prior_precision", "likelihood.noise_covar.raw_noise"}
    net_params = {id(p) for p in net.parameters()}
    assert not any(id(p) in net_params for p in model.parameters())

    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    lik.train()
    start = float(model.log_evidence())
    for _ in range(60):
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        opt.step()
    assert float(model.log_evidence()) > start + 1.0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"network tensor {k} changed"


def test_adam_finds_the_grid_optimum_of_the_exact_evidence() -> None:
    net, x, y = _regression()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.tensor(0.05, dtype=torch.float64)
    lik.noise_covar.raw_noise.requires_grad_(False)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.0)
    grid = torch.logspace(-2, 2, 401, dtype=torch.float64)
    values = []
    with torch.no_grad():
        for d in grid:
            model.prior_precision = d
            values.append(float(model.log_evidence()))
    best = float(grid[int(torch.tensor(values).argmax())])
    model.prior_precision = 1.0
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    opt = torch.optim.Adam([model.covar_module.raw_prior_precision], lr=0.05)
    model.train()
    lik.train()
    for _ in range(300):
        opt.zero_grad()
        (-mll(model(x), y)).backward()
        opt.step()
    assert abs(float(model.prior_precision) / best - 1) < 0.03  # grid spacing is 2.3%


def test_posterior_cache_follows_hyperparameters() -> None:
    net, x, y = _regression()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.0).eval()
    x_test, _ = truth.toy_regression(5, 3, seed=33)
    with torch.no_grad():
        v1 = model(x_test).variance
        model.prior_precision = 10.0
        v2 = model(x_test).variance
    assert (v2 < v1).all()  # a stronger prior shrinks the epistemic variance


def test_state_dict_round_trip() -> None:
    net, x, y = _regression(c=2)
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2).double()
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision={"0": 0.3, "2": 3.0})
    model.likelihood.task_noises = torch.tensor([0.02, 0.07], dtype=torch.float64)
    state = model.state_dict()
    assert not any(k.startswith("network") for k in state)
    other = ntkgp.LinearizedGP(
        net,
        gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2).double(),
        x,
        y,
        prior_precision={"0": 1.0, "2": 1.0},
    )
    other.load_state_dict(state)
    assert torch.equal(other.prior_precision, model.prior_precision)
    assert torch.allclose(other.log_evidence(), model.log_evidence(), rtol=1e-14)


def test_models_are_freed_without_the_cycle_collector() -> None:
    """A GPyTorch module holds itself through its state-dict pre-hook. A LinearizedGP must not:
    a loop that builds one model per step (the marglik tuner) would keep every old model's Grams
    and factors until the collector runs, which on a GPU is an out-of-memory error."""
    net, x, y = _regression()
    gc.collect()
    gc.disable()
    try:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
        model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=torch.tensor([1.0, 2.0, 1.0, 2.0]))
        model.log_evidence().backward()
        model.eval()
        with torch.no_grad():
            assert model(x[:3]).variance.shape == (3,)
        refs = [weakref.ref(o) for o in (model, model.solver, model.covar_module, model.mean_module)]
        del model
        assert [r() is None for r in refs] == [True] * 4
    finally:
        gc.enable()
    # GPyTorch's hook still runs: with strict shapes off, a state of another shape is taken over
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=torch.tensor([1.0, 2.0, 1.0, 2.0]))
    model.covar_module.load_strict_shapes(False)
    model.covar_module.load_state_dict({"raw_prior_precision": torch.zeros(2, dtype=torch.float64)}, strict=False)
    assert model.covar_module.raw_prior_precision.shape == (2,)


def test_multitask_predictive_shapes_and_noise() -> None:
    net, x, y = _regression(c=2)
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2).double()
    model = ntkgp.LinearizedGP(net, lik, x, y).eval()
    lik.eval()
    x_test, _ = truth.toy_regression(7, 3, seed=34)
    with torch.no_grad():
        f = model(x_test)
        p = lik(f)
    assert isinstance(f, gpytorch.distributions.MultitaskMultivariateNormal)
    assert f.mean.shape == (7, 2) and f.variance.shape == (7, 2)
    assert torch.allclose(p.variance, f.variance + lik.task_noises + lik.noise, rtol=1e-12)
    # lazily computed variances equal the dense covariance's diagonal
    assert torch.allclose(f.variance.reshape(-1), f.covariance_matrix.diagonal(), rtol=1e-12)


def test_predictive_covariance_matmul_is_lazy_and_exact() -> None:
    for solver in ("kernel", "weight"):
        net, x, y = _regression()
        model = ntkgp.LinearizedGP(net, gpytorch.likelihoods.GaussianLikelihood().double(), x, y, solver=solver)
        model.eval()
        x_test, _ = truth.toy_regression(6, 3, seed=35)
        with torch.no_grad():
            cov = model(x_test).lazy_covariance_matrix
            v = torch.randn(6, 2, dtype=torch.float64)
            lazy = cov @ v
            dense = cov.to_dense() @ v
        assert torch.allclose(lazy, dense, rtol=1e-9, atol=1e-12)


def test_fixed_noise_likelihood_uses_kernel_space_and_matches_truth() -> None:
    net, x, y = _regression()
    noise = torch.linspace(0.01, 0.2, x.shape[0], dtype=torch.float64)
    lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=2.0)  # P = 51 > N = 40 would allow either
    assert model.solver.name == "kernel"
    brute = truth.log_evidence(net, x, y, truth.prior_vector(net, 2.0), noise)
    assert abs(float(model.log_evidence() - brute)) <= 1e-10 * abs(float(brute))
    with pytest.raises(ValueError, match="same for every data point"):
        ntkgp.LinearizedGP(net, lik, x, y, solver="weight")


def test_batchnorm_in_eval_mode_and_conv_inputs() -> None:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 1)]
    net = nn.Sequential(*layers).double()
    x = torch.randn(25, 1, 6, 6, dtype=torch.float64)
    y = torch.randn(25, dtype=torch.float64)
    net.train()
    net(x)  # populate running statistics
    net.eval()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.tensor(0.1, dtype=torch.float64)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.0)
    brute = truth.log_evidence(net, x, y, truth.prior_vector(net, 1.0), torch.full((25,), 0.1, dtype=torch.float64))
    assert abs(float(model.log_evidence() - brute)) <= 1e-10 * abs(float(brute))
    model.eval()
    with torch.no_grad():
        a = model(x[:3]).variance
        b = model(x[:3].reshape(3, -1)).variance  # flattened inputs are accepted too
    assert torch.equal(a, b)


def test_network_mode_handling() -> None:
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    x, y = truth.toy_regression(10, 3)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    with pytest.raises(ValueError, match="net.eval()"):
        ntkgp.LinearizedGP(net.train(), lik, x, y)
    model = ntkgp.LinearizedGP(net.eval(), lik, x, y)  # dropout off in eval mode: deterministic
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).mean, model(x).mean)
    plain = truth.mlp(3, 4, 1).train()
    with pytest.warns(UserWarning, match="train mode"):
        ntkgp.LinearizedGP(plain, lik, x, y)
    assert plain.training, "the user's module must not be switched to eval"


def test_ntk_kernel_composes_with_gpytorch_kernels() -> None:
    net, x, y = _regression()
    ntk = ntkgp.NTKKernel(net, prior_precision=2.0, input_shape=(3,))
    rbf = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    kernel = ntk + rbf
    with torch.no_grad():
        dense = kernel(x).to_dense()
        expected = ntk(x).to_dense() + rbf(x).to_dense()
    j = truth.jacobian(net, x)
    assert torch.allclose(ntk(x).to_dense(), j @ j.T / 2.0, rtol=1e-10)
    assert torch.allclose(dense, expected, rtol=1e-12)
    assert isinstance(ntk(x).evaluate_kernel(), ntkgp.NTKLinearOperator)
    assert torch.allclose(ntk(x, diag=True), (j * j).sum(-1) / 2.0, rtol=1e-10)
    assert not any(p is q for p in kernel.parameters() for q in net.parameters())


def test_set_train_data_is_refused() -> None:
    net, x, y = _regression()
    model = ntkgp.LinearizedGP(net, gpytorch.likelihoods.GaussianLikelihood().double(), x, y)
    with pytest.raises(NotImplementedError, match="new LinearizedGP"):
        model.set_train_data(targets=y + 1, strict=False)


@pytest.mark.parametrize("budget", [2**30, 4096])
def test_mixed_network_predictive_with_streamed_jacobians(budget: int) -> None:
    """Conv (generic) + Linear (structured) layers; a tiny budget streams every Jacobian block."""
    torch.manual_seed(1)
    net = (
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4), nn.Tanh(), nn.Linear(4, 2))
        .double()
        .eval()
    )
    x = torch.randn(30, 1, 5, 5, dtype=torch.float64)
    y = torch.randn(30, 2, dtype=torch.float64)
    x_test = torch.randn(6, 1, 5, 5, dtype=torch.float64)
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, has_task_noise=False).double()
    lik.noise = torch.tensor(0.05, dtype=torch.float64)
    model = ntkgp.LinearizedGP(
        net, lik, x, y, prior_precision=torch.linspace(0.5, 3.0, 6), solver="kernel", memory_budget=budget, chunk_size=7
    ).eval()
    with torch.no_grad():
        f = model(x_test)
        cov, var = f.covariance_matrix, f.variance.reshape(-1)
    prior = truth.prior_vector(net, torch.linspace(0.5, 3.0, 6).tolist())
    j, jt = truth.jacobian(net, x), truth.jacobian(net, x_test)
    brute = truth.posterior_covariance(j, jt, prior, torch.full((60,), 0.05, dtype=torch.float64))
    assert torch.allclose(cov, brute, rtol=1e-9, atol=1e-12 * brute.abs().max())
    assert torch.allclose(var, brute.diagonal(), rtol=1e-9, atol=1e-12 * brute.abs().max())


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_many_test_points_cost_linear_memory_and_match_small_calls(solver: str, monkeypatch) -> None:
    """Variances and per-point blocks for many test points never form an n x n matrix."""
    net, x, y = _regression(c=2)
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2).double()
    model = ntkgp.LinearizedGP(net, lik, x, y, solver=solver).eval()
    x_test, _ = truth.toy_regression(3000, 3, seed=36)
    with torch.no_grad():
        small = torch.cat([model(xb).variance for xb in x_test[:300].split(7)])
    allocations = []
    real_zeros = torch.zeros

    def watch(*size, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        allocations.append(int(torch.tensor(shape).prod()) if len(shape) else 1)
        return real_zeros(*size, **kwargs)

    monkeypatch.setattr(torch, "zeros", watch)
    with torch.no_grad():
        f = model(x_test)
        big = f.variance
        blocks = f.lazy_covariance_matrix.point_blocks()
    monkeypatch.setattr(torch, "zeros", real_zeros)
    assert max(allocations, default=0) < 3000 * 3000  # nothing quadratic in the number of test points
    assert torch.allclose(big[:300], small, rtol=1e-10)
    assert torch.allclose(blocks.diagonal(dim1=-2, dim2=-1), big, rtol=1e-12)
