"""Adding observations without a rebuild: equal to a LinearizedGP rebuilt on all the data, to 1e-9.

The truth is ntkgp's own rebuilt model (whose exactness against brute force is tested in
``test_against_truth.py``) and, for the linear algebra, ``torch.linalg.cholesky`` of the updated
matrices.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
import truth

import ntkgp
from ntkgp.linalg.bordered import MAX_DEPTH, BorderedCholesky
from ntkgp.solvers.update import cholesky_update

TOL = 1e-9


def _likelihood(c: int, noise: float = 0.05) -> gpytorch.likelihoods.Likelihood:
    if c == 1:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=c, has_task_noise=False).double()
    lik.noise = noise
    return lik


def _case(c: int, solver: str):
    x, y = truth.toy_regression(46, 3, c, seed=1)
    net = truth.mlp(3, 12 if solver == "kernel" else 3, c, seed=2).eval()
    return net, x, y


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


def _agree(model: ntkgp.LinearizedGP, ref: ntkgp.LinearizedGP, x_test: torch.Tensor) -> None:
    model.eval(), ref.eval()
    with torch.no_grad():
        a, b = model(x_test), ref(x_test)
        assert _close(a.mean, b.mean)
        assert _close(a.covariance_matrix, b.covariance_matrix)
        assert abs(float(model.log_evidence() - ref.log_evidence())) <= TOL * abs(float(ref.log_evidence()))


@pytest.mark.parametrize("solver,c", [("kernel", 1), ("kernel", 2), ("weight", 1), ("weight", 2)])
def test_add_data_and_fantasy_equal_a_rebuilt_model(solver: str, c: int) -> None:
    net, x, y = _case(c, solver)
    x_test = torch.randn(5, 3, dtype=torch.float64)
    model = ntkgp.LinearizedGP(net, _likelihood(c), x[:36], y[:36], prior_precision=2.0, solver=solver).eval()
    model.posterior()  # the factor the update extends
    before = model(x_test).covariance_matrix.detach()
    fantasy = model.get_fantasy_model(x[36:], y[36:])
    assert torch.equal(model(x_test).covariance_matrix.detach(), before)  # the original is untouched
    assert model.num_data == 36 and fantasy.num_data == 46
    if solver == "kernel":
        assert isinstance(fantasy.solver.bordered, BorderedCholesky)  # extended, not refactored
    else:
        _, factor = fantasy.solver.last_factor  # updated by rank kC: the brute-force precision's factor
        j = truth.jacobian(net, x)
        noise = fantasy.likelihood.noise.detach().reshape(())  # 0.05 as rounded by the likelihood's setter
        precision = j.T @ j / noise + 2.0 * torch.eye(j.shape[1], dtype=torch.float64)
        assert _close(factor, torch.linalg.cholesky(precision))
    model.add_data(x[36:41], y[36:41]).add_data(x[41:], y[41:])
    ref = ntkgp.LinearizedGP(net, _likelihood(c), x, y, prior_precision=2.0, solver=solver)
    _agree(model, ref, x_test)
    _agree(fantasy, ref, x_test)


def test_add_data_then_other_hyperparameters_and_their_gradients() -> None:
    net, x, y = _case(1, "kernel")
    model = ntkgp.LinearizedGP(net, _likelihood(1), x[:40], y[:40], prior_precision=2.0, solver="kernel")
    model.posterior()
    model.add_data(x[40:], y[40:])
    ref = ntkgp.LinearizedGP(net, _likelihood(1), x, y, prior_precision=2.0, solver="kernel")
    for m in (model, ref):
        m.prior_precision = 3.0
        m.likelihood.noise = 0.02
    _agree(model, ref, torch.randn(4, 3, dtype=torch.float64))
    grads = []
    for m in (model, ref):
        m.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(m.likelihood, m)
        (-mll(m(m.train_x.data), m.train_targets)).backward()
        grads.append(torch.cat([m.covar_module.raw_prior_precision.grad, m.likelihood.raw_noise.grad.reshape(-1)]))
    assert _close(grads[0], grads[1])


def test_fixed_noise_and_a_long_chain_of_additions() -> None:
    net, x, y = _case(1, "kernel")
    noise = torch.linspace(0.01, 0.1, 46, dtype=torch.float64)
    lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise[:30])
    model = ntkgp.LinearizedGP(net, lik, x[:30], y[:30], solver="kernel").eval()
    model.posterior()
    with pytest.raises(ValueError, match="noise="):
        model.add_data(x[30:31], y[30:31])
    for i in range(30, 46):  # more additions than MAX_DEPTH: the chain is collapsed on the way
        model.add_data(x[i : i + 1], y[i : i + 1], noise=noise[i : i + 1])
        model.posterior()
    assert 16 > MAX_DEPTH and model.solver.bordered.depth <= MAX_DEPTH
    ref = ntkgp.LinearizedGP(net, gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise), x, y, solver="kernel")
    _agree(model, ref, torch.randn(4, 3, dtype=torch.float64))


def test_approximate_solvers_rebuild_and_laplace_refuses() -> None:
    net, x, y = _case(1, "kernel")
    spec = ntkgp.solvers.SubsetOfData(indices=torch.arange(0, 40, 2))
    model = ntkgp.LinearizedGP(net, _likelihood(1), x[:40], y[:40], solver=spec).eval()
    model.posterior()
    model.add_data(x[40:], y[40:])
    ref = ntkgp.LinearizedGP(net, _likelihood(1), x, y, solver=spec)
    _agree(model, ref, torch.randn(4, 3, dtype=torch.float64))

    labels = (y > 0).long()
    net2 = truth.mlp(3, 6, 2, seed=2).eval()
    gp = ntkgp.LinearizedGP(net2, ntkgp.likelihoods.SoftmaxLikelihood(num_classes=2), x, labels)
    with pytest.raises(NotImplementedError, match="MAP"):
        gp.add_data(x[:2], labels[:2])


@pytest.mark.parametrize("p,k,panel", [(70, 3, 16), (50, 20, 8), (9, 4, 32)])
def test_cholesky_update_against_a_refactorization(p: int, k: int, panel: int) -> None:
    g = torch.Generator().manual_seed(p)
    a = torch.randn(p, p + 3, generator=g, dtype=torch.float64)
    a = a @ a.T / p + 0.1 * torch.eye(p, dtype=torch.float64)
    u = torch.randn(p, k, generator=g, dtype=torch.float64)
    updated = cholesky_update(torch.linalg.cholesky(a), u, panel=panel)
    assert _close(updated, torch.linalg.cholesky(a + u @ u.T))


@pytest.mark.parametrize("c", [1, 2])
def test_weight_space_update_pulls_only_the_new_rows(c: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``add_data`` the posterior weights' :math:`J^\\top S^{-1} r` is the old one plus the new rows' terms
    (no pass over all points), equal to the rebuilt model's; new hyperparameters pull afresh."""
    import ntkgp.solvers.weight_space as weight_space

    net, x, y = _case(c, "weight")
    x_test = torch.randn(5, 3, dtype=torch.float64)
    model = ntkgp.LinearizedGP(net, _likelihood(c), x[:36], y[:36], prior_precision=2.0, solver="weight").eval()
    model.posterior()
    calls = {"pullback": 0}
    original = weight_space.pullback

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["pullback"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(weight_space, "pullback", counted)
    model.add_data(x[36:], y[36:])
    model.posterior()
    assert calls["pullback"] == 0
    ref = ntkgp.LinearizedGP(net, _likelihood(c), x, y, prior_precision=2.0, solver="weight").eval()
    with torch.no_grad():
        assert _close(model(x_test).mean, ref(x_test).mean)
        assert _close(model.posterior().weights, ref.posterior().weights)
    calls["pullback"] = 0
    model.likelihood.noise = 0.07
    ref.likelihood.noise = 0.07
    with torch.no_grad():
        assert _close(model(x_test).mean, ref(x_test).mean)
    assert calls["pullback"] == 2  # the model's and the reference's posteriors, both pulled afresh
