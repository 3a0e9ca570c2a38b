"""Predictions differentiated in their inputs, against a float64 autograd truth and laplace-torch.

The truth is the GLM predictive written out in weight space, with the test Jacobian
:math:`J(x_*)` from ``torch.autograd.functional.jacobian(..., create_graph=True)``, so autograd
differentiates it in :math:`x_*`:

.. math::
    \\mu(x_*) = f(x_*) + J(x_*)(\\bar\\theta - \\hat\\theta),\\qquad
    \\Sigma(x_*) = J(x_*) A^{-1} J(x_*)^\\top,\\qquad A = J^\\top S^{-1} J + P_0.

Gradients of random projections of the mean, the variances and the joint covariance are compared
to a relative 1e-7 on every structured route (dense, conv, affine, embedding next to dense inputs)
and on the generic route, in kernel and weight space.
"""

from __future__ import annotations

import functools

import gpytorch
import pytest
import torch
import truth
from torch import Tensor, nn
from torch.func import functional_call

import ntkgp

TOL = 1e-7


class Conv(nn.Module):
    """A 1-d CNN on ``(n, 2, 8)`` inputs: dense sites at many positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.out = nn.Linear(24, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.conv(x)).flatten(1))


class Opaque(nn.Module):
    """``x @ W`` (an opaque use: the generic route) followed by a structured ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6) * 0.5)
        self.out = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(x @ self.w))


class Mixed(nn.Module):
    """Token ids and float features (a tuple input): an embedding unit next to dense units."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, ids: Tensor, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(ids).sum(1) + self.lin(x)))


def _net(kind: str, c: int) -> nn.Module:
    torch.manual_seed(3)
    if kind == "mlp":
        return truth.mlp(3, 8, c, seed=3)
    if kind == "layernorm":
        return nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, c)).double()
    if kind == "conv":
        return Conv().double()
    if kind == "opaque":
        return Opaque().double()
    return Mixed().double()


def _data(kind: str, n: int, seed: int) -> tuple[object, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        x = torch.randn(n, 2, 8, generator=g, dtype=torch.float64)
        return x, x
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if kind == "mixed":
        return (torch.randint(0, 5, (n, 2), generator=g), x), x
    return x, x


def _call(net: nn.Module, params: dict[str, Tensor], x: object) -> Tensor:
    args = x if isinstance(x, tuple) else (x,)
    return functional_call(net, params, args).reshape(args[0].shape[0], -1)


def brute_predictive(net: nn.Module, x: object, y: Tensor, x_test: object, delta: float, noise: float):
    """``(mean (n*, C), covariance (n* C, n* C))`` differentiable in the float tensors of ``x_test``."""
    names = [n for n, _ in net.named_parameters()]
    theta_hat = tuple(p.detach() for p in net.parameters())

    def jac(inputs: object, create_graph: bool) -> Tensor:
        def f(*ps: Tensor) -> Tensor:
            return _call(net, dict(zip(names, ps)), inputs).reshape(-1)

        j = torch.autograd.functional.jacobian(f, theta_hat, create_graph=create_graph)
        return torch.cat([b.reshape(b.shape[0], -1) for b in j], 1)

    flat = torch.cat([p.reshape(-1) for p in theta_hat])
    j = jac(x, False)
    f = _call(net, dict(zip(names, theta_hat)), x).detach().reshape(-1)
    precision = j.T @ j / noise + delta * torch.eye(flat.numel(), dtype=torch.float64)
    theta_bar = torch.linalg.solve(precision, j.T @ (y.reshape(-1) - f + j @ flat) / noise)
    js = jac(x_test, True)
    fs = _call(net, dict(zip(names, theta_hat)), x_test)
    mean = fs + (js @ (theta_bar - flat)).reshape(fs.shape)
    return mean, js @ torch.linalg.solve(precision, js.T)


def _gp(net: nn.Module, x: object, y: Tensor, c: int, solver: str, implementation: str) -> ntkgp.LinearizedGP:
    if c == 1:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=c, has_task_noise=False).double()
    lik.noise = 0.05
    gp = ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision=2.0, solver=solver, implementation=implementation)
    return gp.eval()


def _grad(value: Tensor, projection: Tensor, wrt: Tensor) -> Tensor:
    return torch.autograd.grad((value * projection).sum(), wrt, retain_graph=True)[0]


CASES = [
    ("mlp", 1, "kernel", "structured"),
    ("mlp", 1, "weight", "structured"),
    ("mlp", 2, "kernel", "structured"),
    ("mlp", 2, "weight", "generic"),
    ("mlp", 1, "kernel", "generic"),
    ("layernorm", 1, "kernel", "structured"),
    ("conv", 1, "kernel", "structured"),
    ("conv", 1, "weight", "structured"),
    ("opaque", 1, "kernel", "structured"),
    ("mixed", 1, "kernel", "structured"),
]


@pytest.mark.parametrize("kind,c,solver,implementation", CASES)
def test_gradients_of_mean_variance_and_covariance(kind: str, c: int, solver: str, implementation: str) -> None:
    net = _net(kind, c)
    x, _ = _data(kind, 24, seed=1)
    with torch.no_grad():
        y = _call(net, dict(net.named_parameters()), x) + 0.1
    y = y[:, 0] if c == 1 else y
    gp = _gp(net, x, y, c, solver, implementation)
    x_test, floats = _data(kind, 4, seed=2)
    floats = floats.clone().requires_grad_(True)
    x_test = (x_test[0], floats) if kind == "mixed" else floats

    out = gp(x_test)
    mean, var, cov = out.mean.reshape(4, c), out.variance.reshape(-1), out.covariance_matrix
    true_mean, true_cov = brute_predictive(net, x, y, x_test, 2.0, 0.05)
    assert float((mean - true_mean).abs().max()) <= TOL * float(true_mean.abs().max())
    assert float((cov - true_cov).abs().max()) <= TOL * float(true_cov.abs().max())

    g = torch.Generator().manual_seed(7)
    for value, reference in ((mean, true_mean), (var, true_cov.diagonal()), (cov, true_cov)):
        projection = torch.randn(value.shape, generator=g, dtype=torch.float64)
        got, want = _grad(value, projection, floats), _grad(reference, projection, floats)
        assert float((got - want).abs().max()) <= TOL * float(want.abs().max()), (kind, solver, implementation)


def test_training_caches_stay_gradient_free() -> None:
    net = _net("mlp", 1)
    x, _ = _data("mlp", 24, seed=1)
    y = torch.randn(24, dtype=torch.float64)
    gp = _gp(net, x, y, 1, "kernel", "structured")
    x_test = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    gp(x_test).variance.sum().backward()
    post = gp.posterior()
    assert not post.weights.requires_grad and not post.cholesky_factor.requires_grad
    assert all(not c.cotangents.requires_grad for c in post.kernel.reference_captures)
    assert x_test.grad is not None and torch.isfinite(x_test.grad).all()


def test_embedding_ids_are_not_differentiated_and_need_no_grad() -> None:
    net = _net("mixed", 1)
    x, _ = _data("mixed", 24, seed=1)
    y = torch.randn(24, dtype=torch.float64)
    gp = _gp(net, x, y, 1, "kernel", "structured")
    (ids, floats), _ = _data("mixed", 3, seed=5)
    with torch.no_grad():
        plain = gp((ids, floats)).variance
    floats = floats.clone().requires_grad_(True)
    var = gp((ids, floats)).variance
    assert torch.allclose(var.detach(), plain, rtol=1e-12, atol=0)
    var.sum().backward()
    assert floats.grad is not None and floats.grad.abs().sum() > 0


@functools.cache
def _map_case() -> tuple[nn.Module, Tensor, Tensor]:
    x, y = truth.toy_regression(40, 3, seed=1)
    net = truth.mlp(3, 8, 1, seed=3)
    assert truth.train_map(net, x, y, truth.prior_vector(net, 2.0), 0.05, iters=3) < 1e-8
    return net.eval(), x, y


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_gradients_match_laplace_torch_enable_backprop(solver: str) -> None:
    """laplace-torch's full GLM predictive with ``enable_backprop=True`` on the same net at its MAP."""
    from laplace import Laplace
    from laplace.curvature import AsdlGGN
    from torch.utils.data import DataLoader, TensorDataset

    net, x, y = _map_case()
    noise, delta = 0.05, 2.0
    la = Laplace(
        net,
        "regression",
        subset_of_weights="all",
        hessian_structure="full",
        sigma_noise=torch.tensor(noise, dtype=torch.float64).sqrt(),
        prior_precision=torch.tensor([delta], dtype=torch.float64),
        backend=AsdlGGN,
        enable_backprop=True,
    )
    la.fit(DataLoader(TensorDataset(x, y[:, None]), batch_size=len(x)))
    gp = _gp(net, x, y, 1, solver, "structured")
    x_test = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    out = gp(x_test)
    peer_mean, peer_cov = la(x_test, pred_type="glm", joint=True)
    g = torch.Generator().manual_seed(3)
    pairs = (
        (out.mean, peer_mean.reshape(-1)),
        (out.variance, peer_cov.diagonal()),
        (out.covariance_matrix, peer_cov),
    )
    for value, reference in pairs:
        assert float((value - reference).abs().max()) <= 1e-6 * float(reference.abs().max())
        projection = torch.randn(value.shape, generator=g, dtype=torch.float64)
        got, want = _grad(value, projection, x_test), _grad(reference, projection, x_test)
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
