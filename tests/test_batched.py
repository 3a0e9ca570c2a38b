"""Batched test inputs ``(*batch, q, d)``: joint distributions per group equal the blocks of the full one.

The truth is the dense joint covariance over all the points (``covariance_matrix`` of an unbatched
call, tested against brute force elsewhere): each group's ``qC x qC`` covariance must be its diagonal
block, for every posterior form (kernel and weight space, inducing points, Lanczos, a Laplace GP),
structured and generic routes, and the prior.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
import truth
from gpytorch.distributions import MultitaskMultivariateNormal
from torch import nn

import ntkgp


def _blocks(cov: torch.Tensor, groups: int) -> torch.Tensor:
    size = cov.shape[-1] // groups
    return torch.stack([cov[b * size : (b + 1) * size, b * size : (b + 1) * size] for b in range(groups)])


def _check(model: ntkgp.LinearizedGP, x_test: object, batched: object, batch: tuple[int, ...], q: int) -> None:
    c = model.num_outputs
    with torch.no_grad():
        full, out = model(x_test), model(batched)
    assert out.batch_shape == torch.Size(batch)
    assert isinstance(out, MultitaskMultivariateNormal) == (c > 1)
    expected_mean = full.mean.reshape(*batch, q, c) if c > 1 else full.mean.reshape(*batch, q)
    assert torch.allclose(out.mean, expected_mean, rtol=0, atol=1e-12)
    groups = int(torch.tensor(batch).prod())
    want = _blocks(full.covariance_matrix, groups)
    got = out.covariance_matrix.reshape(groups, q * c, q * c)
    assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())


def _gp(c: int, solver, implementation: str = "structured", budget: int | None = None) -> ntkgp.LinearizedGP:
    x, y = truth.toy_regression(30, 3, c, seed=1)
    net = truth.mlp(3, 10, c, seed=2).eval()
    lik = (
        gpytorch.likelihoods.GaussianLikelihood()
        if c == 1
        else gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=c, has_task_noise=False)
    ).double()
    lik.noise = 0.05
    kwargs = {} if budget is None else {"memory_budget": budget}
    return ntkgp.LinearizedGP(net, lik, x, y, solver=solver, implementation=implementation, **kwargs).eval()


@pytest.mark.parametrize(
    "c,solver,implementation",
    [
        (1, "kernel", "structured"),
        (2, "kernel", "structured"),
        (2, "weight", "structured"),
        (1, "weight", "generic"),
        (2, "kernel", "generic"),
        (1, ntkgp.solvers.Inducing(num_inducing=8, selection=torch.arange(0, 24, 3)), "structured"),
        (2, ntkgp.solvers.Lanczos(rank=6), "structured"),
    ],
)
def test_groups_equal_blocks_of_the_joint_covariance(c: int, solver, implementation: str) -> None:
    model = _gp(c, solver, implementation)
    x_test = torch.randn(12, 3, dtype=torch.float64)
    _check(model, x_test, x_test.reshape(2, 2, 3, 3), (2, 2), 3)
    _check(model, x_test, x_test.reshape(12, 1, 3), (12,), 1)  # q = 1: per-point distributions
    with gpytorch.settings.prior_mode(True):
        _check(model, x_test, x_test.reshape(3, 4, 3), (3,), 4)


def test_broadcast_leaves_conv_units_and_the_group_by_group_fallback() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(4, 3)
            self.conv = nn.Conv1d(1, 2, 3, padding=1)
            self.out = nn.Linear(3, 1)

        def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.conv(x.unsqueeze(1))).sum(1) + self.emb(ids).sum(1)
            return self.out(h)

    torch.manual_seed(0)
    net = Net().double().eval()
    g = torch.Generator().manual_seed(1)
    ids, x = torch.randint(0, 4, (20, 2), generator=g), torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, dtype=torch.float64)
    for budget in (None, 256):  # 256 bytes: the conv unit's weight gradients do not fit, group by group
        kwargs = {} if budget is None else {"memory_budget": budget}
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
        model = ntkgp.LinearizedGP(net, lik, (ids, x), y, solver="kernel", **kwargs).eval()
        ids_t, x_t = torch.randint(0, 4, (6, 2), generator=g), torch.randn(6, 3, generator=g, dtype=torch.float64)
        # the ids are shared by both batches (broadcast), the features differ
        x_b = torch.stack([x_t, x_t.flip(0)])  # shape: (2, 6, 3)
        full = (ids_t.repeat(2, 1), x_b.reshape(12, 3))
        _check(model, full, (ids_t, x_b), (2,), 6)


def test_laplace_gp_groups() -> None:
    x, y = truth.toy_regression(30, 3, seed=1)
    net = truth.mlp(3, 8, 3, seed=2).eval()
    model = ntkgp.LinearizedGP(net, ntkgp.likelihoods.SoftmaxLikelihood(num_classes=3), x, (y > 0).long()).eval()
    x_test = torch.randn(8, 3, dtype=torch.float64)
    _check(model, x_test, x_test.reshape(4, 2, 3), (4,), 2)


def test_batched_inputs_need_eval_mode() -> None:
    model = _gp(1, "kernel").train()
    with pytest.raises(RuntimeError, match="eval"):
        model(torch.randn(2, 3, 3, dtype=torch.float64))
