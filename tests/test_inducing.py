"""Inducing-point (SGPR / Titsias) route against dense float64 truths.

Truth: the full NTK K = J P0^-1 J^T from brute-force Jacobians, the Nystrom kernel
Q = K_XZ K_ZZ^-1 K_ZX, and the textbook formulas (collapsed bound, DTC predictive, the Laplace
lower bound) evaluated densely.
"""

from __future__ import annotations

import math
import sys

import gpytorch
import pytest
import torch
import torch.nn.functional as F
import truth
from builders import make_problem
from sklearn.datasets import load_wine

import ntkgp
from ntkgp.likelihoods import SoftmaxLikelihood
from ntkgp.solvers import Inducing
from ntkgp.solvers.inducing import kmeans_points, pivoted_cholesky_points, random_points

REL = 1e-8
#: K_ZZ of a few points of a small tanh MLP has condition numbers ~1e10: with the default jitter
#: (1e-8) no float64 algorithm, dense truth included, gets more than ~6 digits of the bound. The
#: comparisons with the dense truth use a jitter of 1e-6 in both, which makes the problem
#: well-conditioned and tests the algebra to round-off.
JITTER = 1e-6


def _regression(c: int, prior_spec, n: int = 50):
    x, y = truth.toy_regression(n, 3, c, seed=1)
    x_test, _ = truth.toy_regression(7, 3, c, seed=2)
    net = truth.mlp(3, 32, c, seed=3)
    prior = truth.prior_vector(net, prior_spec)  # the GP algebra holds at any weights: no MAP needed
    return net.eval(), x, y, x_test, prior


def _likelihood(c: int, noise: float):
    if c == 1:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=c, has_task_noise=False).double()
    lik.noise = noise
    return lik


def _noise_of(lik) -> torch.Tensor:
    """The likelihood's noise per output, as stored (the constraint round-trips 0.09 to 0.0900000036)."""
    c = lik.num_tasks if isinstance(lik, gpytorch.likelihoods.MultitaskGaussianLikelihood) else 1
    return lik.noise.detach().reshape(-1).to(torch.float64).expand(c)


def _dense_truth(net, x, y, x_test, prior, idx, noise, jitter=JITTER):
    """Collapsed bound and SGPR predictive, densely."""
    return truth.sgpr(net, x, y, x_test, prior, idx, noise, jitter)[:3]


@pytest.mark.parametrize(("c", "prior_spec"), [(1, 2.0), (1, [0.5, 3.0, 1.5, 4.0]), (2, 2.0)])
def test_gaussian_bound_and_predictive_match_dense_truth(c: int, prior_spec) -> None:
    net, x, y, x_test, prior = _regression(c, prior_spec)
    noise = 0.09
    idx = torch.tensor([1, 4, 9, 15, 22, 30, 31, 40, 47])
    spec = torch.tensor(prior_spec, dtype=torch.float64) if isinstance(prior_spec, list) else prior_spec
    model = ntkgp.LinearizedGP(
        net,
        _likelihood(c, noise),
        x,
        y if c > 1 else y.reshape(-1),
        prior_precision=spec,
        solver=Inducing(selection=idx, jitter=JITTER),
    )
    bound, mean, cov = _dense_truth(net, x, y, x_test, prior, idx, _noise_of(model.likelihood))
    assert torch.allclose(model.log_evidence().detach(), bound, rtol=REL, atol=0)
    model.eval()
    post = model(x_test)
    assert torch.allclose(post.mean.reshape(-1), mean, rtol=1e-7, atol=1e-9)
    assert torch.allclose(post.covariance_matrix, cov, rtol=1e-6, atol=1e-9 * cov.diagonal().max())
    assert torch.allclose(post.variance.reshape(-1), cov.diagonal(), rtol=1e-6, atol=0)


def test_network_mean_and_single_factorization(monkeypatch) -> None:
    net, x, y, x_test, _ = _regression(1, 2.0)
    model = ntkgp.LinearizedGP(
        net, _likelihood(1, 0.09), x, y.reshape(-1), prior_precision=2.0, solver=Inducing(8, mean="network")
    )
    factorizations = []
    factors = type(model.solver)._factors
    monkeypatch.setattr(type(model.solver), "_factors", lambda self, *a: factorizations.append(1) or factors(self, *a))
    evidence = model.log_evidence()  # the bound's trace term reuses the quadratic form's factorization
    assert len(factorizations) == 1
    evidence.backward()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x_test).mean, net(x_test).reshape(-1), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="mean"):
        Inducing(8, mean="map")


def test_all_points_inducing_equals_exact() -> None:
    net, x, y, x_test, _ = _regression(1, 2.0, n=40)
    exact = ntkgp.LinearizedGP(net, _likelihood(1, 0.09), x, y.reshape(-1), prior_precision=2.0, solver="kernel")
    full = ntkgp.LinearizedGP(
        net,
        _likelihood(1, 0.09),
        x,
        y.reshape(-1),
        prior_precision=2.0,
        solver=Inducing(selection=torch.arange(40), jitter=1e-12),
    )
    # the jitter shrinks Q: the gap is ~700 * jitter nats here (6.7e-6 at the default 1e-8)
    assert torch.allclose(full.log_evidence().detach(), exact.log_evidence().detach(), rtol=1e-9, atol=0)
    exact.eval(), full.eval()
    a, b = exact(x_test), full(x_test)
    assert torch.allclose(a.mean, b.mean, rtol=1e-7, atol=1e-9)
    assert torch.allclose(a.variance, b.variance, rtol=1e-5, atol=1e-9)


def test_bound_is_below_exact_and_tightens_with_more_points() -> None:
    net, x, y, _, _ = _regression(1, 2.0, n=60)
    exact = ntkgp.LinearizedGP(net, _likelihood(1, 0.09), x, y.reshape(-1), prior_precision=2.0)
    target = float(exact.log_evidence())
    bounds = []
    for m in (2, 5, 10, 20, 40):
        model = ntkgp.LinearizedGP(
            net,
            _likelihood(1, 0.09),
            x,
            y.reshape(-1),
            prior_precision=2.0,
            solver=Inducing(num_inducing=m, selection="pivoted_cholesky"),
        )  # nested
        bounds.append(float(model.log_evidence()))
    assert all(b <= target + 1e-8 for b in bounds)
    assert all(b2 > b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert target - bounds[-1] < 1e-3 * abs(target)


def test_gradients_match_dense_truth() -> None:
    spec = [0.5, 3.0, 1.5, 4.0]
    net, x, y, _, _ = _regression(1, spec)
    idx = torch.tensor([0, 3, 8, 13, 21, 34])
    lik = _likelihood(1, 0.09)
    model = ntkgp.LinearizedGP(
        net,
        lik,
        x,
        y.reshape(-1),
        prior_precision=torch.tensor(spec, dtype=torch.float64),
        solver=Inducing(selection=idx, jitter=JITTER),
    )
    model.log_evidence().backward()
    raw_delta = model.covar_module.raw_prior_precision.grad.clone()
    raw_noise = lik.raw_noise.grad.clone()

    delta = torch.tensor(spec, dtype=torch.float64, requires_grad=True)
    noise = _noise_of(lik).clone().requires_grad_(True)
    prior = torch.cat([d.expand(p.numel()) for d, p in zip(delta, net.parameters())])
    bound = _dense_truth(net, x, y, x[:2], prior, idx, noise)[0]
    g_delta, g_noise = torch.autograd.grad(bound, (delta, noise))
    # chain rule through the positivity constraints (softplus)
    d_delta = torch.sigmoid(model.covar_module.raw_prior_precision.detach())
    d_noise = torch.sigmoid(lik.raw_noise.detach())
    assert torch.allclose(raw_delta, g_delta * d_delta, rtol=1e-7, atol=0)
    assert torch.allclose(raw_noise, g_noise * d_noise, rtol=1e-7, atol=0)


def test_gpytorch_loop_uses_the_bound_and_one_data_pass(monkeypatch) -> None:
    net, x, y, x_test, _ = _regression(1, 2.0)
    lik = _likelihood(1, 0.2)
    model = ntkgp.LinearizedGP(net, lik, x, y.reshape(-1), prior_precision=1.0, solver=Inducing(num_inducing=12))
    calls = []
    products = type(model.solver).chunk_products
    monkeypatch.setattr(
        type(model.solver), "chunk_products", lambda self, xc, **kw: calls.append(1) or products(self, xc, **kw)
    )
    captured = []  # capture passes over training points: each chunk once, Phi and the traces from the same pass
    module = sys.modules["ntkgp.ntk.captures"]
    capture = module.captures_with_outputs
    monkeypatch.setattr(module, "captures_with_outputs", lambda ntk, xs: captured.append(xs.num) or capture(ntk, xs))
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train(), lik.train()
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = -mll(model(x), y.reshape(-1))
        if first is None:
            first = float(loss)
            assert math.isclose(-first * x.shape[0], float(model.log_evidence()), rel_tol=1e-10)
        loss.backward()
        opt.step()
    assert float(loss) < first
    passes = len(calls)
    assert passes == len(list(model.network.chunks(model.train_x, model.solver._chunk_rows())))  # one pass, 30 steps
    assert sum(captured) == x.shape[0]
    model.eval(), lik.eval()
    pred = lik(model(x_test))
    assert torch.isfinite(pred.variance).all() and (pred.variance > lik.noise).all()


# ------------------------------------------------------------------------- Laplace (softmax)
@pytest.mark.parametrize(("c", "prior_spec"), [(1, 2.0), (1, [0.5, 3.0, 1.5, 4.0]), (2, 2.0)])
def test_subset_of_regressors_predictive_matches_dense_truth(c: int, prior_spec) -> None:
    """``prior_residual=False``: covariance K_*Z D^-1 K_Z*, the same mean and the same bound."""
    net, x, y, x_test, prior = _regression(c, prior_spec)
    idx = torch.tensor([1, 4, 9, 15, 22, 30, 31, 40, 47])
    spec = torch.tensor(prior_spec, dtype=torch.float64) if isinstance(prior_spec, list) else prior_spec
    targets = y if c > 1 else y.reshape(-1)
    sgpr = ntkgp.LinearizedGP(
        net, _likelihood(c, 0.09), x, targets, prior_precision=spec, solver=Inducing(selection=idx, jitter=JITTER)
    )
    sor = ntkgp.LinearizedGP(
        net,
        _likelihood(c, 0.09),
        x,
        targets,
        prior_precision=spec,
        solver=Inducing(selection=idx, jitter=JITTER, prior_residual=False),
    )
    noise = _noise_of(sor.likelihood).repeat(x.shape[0])
    var = 1 / prior
    j, js = truth.jacobian(net, x), truth.jacobian(net, x_test)
    jz = j[truth.point_rows(idx, c)]
    kzz = jz @ (var[:, None] * jz.T)
    kzz = kzz + JITTER * kzz.diagonal().mean() * torch.eye(kzz.shape[0], dtype=torch.float64)
    kzx, kzs = jz @ (var[:, None] * j.T), jz @ (var[:, None] * js.T)
    d = kzz + kzx @ (kzx.T / noise[:, None])
    cov = kzs.T @ torch.linalg.solve(d, kzs)
    assert torch.equal(sor.log_evidence().detach(), sgpr.log_evidence().detach())
    sor.eval(), sgpr.eval()
    post, reference = sor(x_test), sgpr(x_test)
    assert torch.allclose(post.mean, reference.mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(post.covariance_matrix, cov, rtol=1e-6, atol=1e-9 * cov.diagonal().max())
    assert torch.allclose(post.variance.reshape(-1), cov.diagonal(), rtol=1e-6, atol=0)
    # never above the SGPR variance: it drops the PSD residual K_** - Q_**
    assert (post.variance <= reference.variance * (1 + 1e-10)).all()
    probe = torch.randn(cov.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    product = sor.posterior().covariance_matmul(x_test, probe)  # the lazy operator's route
    assert torch.allclose(product, cov @ probe, rtol=1e-6, atol=1e-9 * cov.diagonal().max())
    # test blocks of one or two points (a small memory budget): the same covariance
    chunked = ntkgp.LinearizedGP(
        net,
        _likelihood(c, 0.09),
        x,
        targets,
        prior_precision=spec,
        memory_budget=2500,
        solver=Inducing(selection=idx, jitter=JITTER, prior_residual=False),
    )
    chunked.eval()
    assert torch.allclose(chunked(x_test).variance.reshape(-1), cov.diagonal(), rtol=1e-6, atol=0)
    assert torch.allclose(
        chunked.posterior().covariance_matmul(x_test, probe), cov @ probe, rtol=1e-6, atol=1e-9 * cov.diagonal().max()
    )


def test_subset_of_regressors_equals_laplace_torch_ella() -> None:
    """laplace-torch's ELLA (all ``M`` Nystrom directions) on its own random subset, in float64."""
    laplace = pytest.importorskip("laplace")
    from torch.utils.data import DataLoader, TensorDataset

    net, x, y, x_test, _ = _regression(1, 2.0, n=60)
    n, m, delta, seed = 60, 12, 2.0, 7
    lik = _likelihood(1, 0.09)
    sigma = math.sqrt(float(_noise_of(lik)[0]))  # the noise as stored, for both libraries
    ella = laplace.ELLA(
        net, "regression", subsample_size=m, n_eigenvalues=m, sigma_noise=sigma, prior_precision=delta, seed=seed
    )
    ella.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    peer_mean, peer_var = ella(x_test)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]  # ELLA's basis points
    model = ntkgp.LinearizedGP(
        net,
        lik,
        x,
        y.reshape(-1),
        prior_precision=delta,
        solver=Inducing(selection=idx, jitter=0.0, mean="network", prior_residual=False),
    )
    model.eval()
    with torch.no_grad():
        latent = model(x_test)
    assert torch.allclose(latent.mean, peer_mean.reshape(-1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(latent.variance, peer_var.reshape(-1), rtol=1e-8, atol=1e-12)
    # a different subset gives a different answer: the comparison can fail
    other = ntkgp.LinearizedGP(
        net,
        lik,
        x,
        y.reshape(-1),
        prior_precision=delta,
        solver=Inducing(selection=torch.arange(m), jitter=0.0, mean="network", prior_residual=False),
    )
    other.eval()
    with torch.no_grad():
        assert not torch.allclose(other(x_test).variance, peer_var.reshape(-1), rtol=1e-3)


def _softmax_case(n: int = 60):
    data = load_wine()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    yy = torch.tensor(data.target)
    perm = torch.randperm(len(yy), generator=torch.Generator().manual_seed(0))
    x, yy, x_test = x[perm[:n]], yy[perm[:n]], x[perm[n : n + 8]]
    net = truth.mlp(x.shape[1], 5, 3, seed=4)
    prior = truth.prior_vector(net, 1.5)
    truth.train_map_loss(net, x, lambda f: F.cross_entropy(f, yy, reduction="sum"), prior)
    return net.eval(), x, yy, x_test, prior


def test_softmax_laplace_bound_matches_dense_truth() -> None:
    net, x, y, x_test, prior = _softmax_case()
    lik = SoftmaxLikelihood(num_classes=3)
    idx = torch.tensor([2, 5, 11, 17, 29, 41, 50])
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.5, solver=Inducing(selection=idx, jitter=JITTER))
    exact = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.5, solver="kernel")
    j, js = truth.jacobian(net, x), truth.jacobian(net, x_test)
    with torch.no_grad():
        f = net(x)
    b = lik.hessian_root(f.to(torch.float64))  # (N, C, C)
    lam = torch.block_diag(*(b @ b.transpose(1, 2)))
    var = 1 / prior
    rows = truth.point_rows(idx, 3)
    kxz = j @ (var[:, None] * j[rows].T)
    kzz = kxz[rows] + JITTER * kxz[rows].diagonal().mean().detach() * torch.eye(len(rows), dtype=torch.float64)
    k = j @ (var[:, None] * j.T)
    q = kxz @ torch.linalg.solve(kzz, kxz.T)
    bdiag = torch.block_diag(*b)
    eye = torch.eye(k.shape[0], dtype=torch.float64)
    log_det = torch.logdet(eye + bdiag.T @ q @ bdiag) + torch.trace(bdiag.T @ (k - q) @ bdiag)
    theta = truth.flat_params(net)
    expected = lik.log_likelihood(f.to(torch.float64), y) - 0.5 * (prior * theta.square()).sum() - 0.5 * log_det
    got = model.log_evidence().detach()
    assert torch.allclose(got, expected, rtol=REL, atol=0)
    assert got <= exact.log_evidence().detach() + 1e-10  # a lower bound on the Laplace evidence
    d = kzz + kxz.T @ lam @ kxz
    ksz = js @ (var[:, None] * j[rows].T)
    cov = js @ (var[:, None] * js.T) - ksz @ (torch.linalg.solve(kzz, ksz.T) - torch.linalg.solve(d, ksz.T))
    model.eval()
    latent = model(x_test)
    assert torch.allclose(latent.covariance_matrix, cov, rtol=1e-6, atol=1e-9 * cov.diagonal().max())
    with torch.no_grad():
        assert torch.allclose(latent.mean.reshape(-1), net(x_test).reshape(-1), rtol=1e-12, atol=1e-12)
    probs = lik(latent).probs
    assert torch.allclose(probs.sum(-1), torch.ones(8, dtype=probs.dtype))
    # subset of regressors: the same Laplace bound, covariance K_*Z D^-1 K_Z*
    sor = ntkgp.LinearizedGP(
        net, lik, x, y, prior_precision=1.5, solver=Inducing(selection=idx, jitter=JITTER, prior_residual=False)
    )
    assert torch.allclose(sor.log_evidence().detach(), expected, rtol=REL, atol=0)
    sor.eval()
    sor_cov = ksz @ torch.linalg.solve(d, ksz.T)
    sor_latent = sor(x_test)
    assert torch.allclose(sor_latent.covariance_matrix, sor_cov, rtol=1e-6, atol=1e-9 * sor_cov.diagonal().max())
    assert torch.allclose(sor_latent.variance.reshape(-1), sor_cov.diagonal(), rtol=1e-6, atol=0)


def test_softmax_laplace_all_points_equals_exact() -> None:
    net, x, y, x_test, _ = _softmax_case(n=40)
    lik = SoftmaxLikelihood(num_classes=3)
    exact = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.5, solver="kernel")
    full = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=1.5, solver=Inducing(selection=torch.arange(40)))
    assert torch.allclose(full.log_evidence().detach(), exact.log_evidence().detach(), rtol=1e-8, atol=0)
    exact.eval(), full.eval()
    assert torch.allclose(exact(x_test).variance, full(x_test).variance, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------- selection
def test_kmeans_blocks_clusters_and_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    import ntkgp.solvers.inducing.selection as selection

    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64)
    x = centres.repeat_interleave(30, 0) + 0.1 * torch.randn(120, 2, generator=gen, dtype=torch.float64)
    whole = kmeans_points(x, 4, torch.Generator().manual_seed(0))
    assert sorted(int(i) // 30 for i in whole) == [0, 1, 2, 3]  # one point from each cluster
    monkeypatch.setattr(selection, "_KMEANS_BLOCK_ELEMENTS", 7)  # distances in blocks of one or two rows
    assert torch.equal(kmeans_points(x, 4, torch.Generator().manual_seed(0)), whole)
    # 20 copies of one point and 5 others: 24 centres need more than the 16 nearest candidates
    dup = torch.cat([torch.zeros(20, 2, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)])
    chosen = kmeans_points(dup, 24, torch.Generator().manual_seed(0))
    assert chosen.unique().numel() == 24 and chosen.device.type == "cpu"


def test_selection_rules() -> None:
    net, x, _, _, _ = _regression(1, 2.0)
    gen = torch.Generator().manual_seed(0)
    a = random_points(50, 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, random_points(50, 10, torch.Generator().manual_seed(3)))
    km = kmeans_points(x, 10, gen)
    assert km.unique().numel() == 10 and (km < 50).all()
    delta = torch.tensor([2.0], dtype=torch.float64)
    piv = pivoted_cholesky_points(make_problem(net, x, 2.0), 10, delta)
    diag = truth.jacobian(net, x).square().sum(-1)
    assert int(diag.argmax()) in piv.tolist()  # the first pivot has the largest prior variance
    # more points than the NTK's rank: stops early instead of picking dependent points
    tiny = truth.mlp(3, 1, 1, seed=0)  # P = 6
    chosen = pivoted_cholesky_points(make_problem(tiny.eval(), x), 20, torch.ones(1, dtype=torch.float64))
    assert chosen.numel() <= 6


def test_bad_inducing_input() -> None:
    net, x, y, _, _ = _regression(1, 2.0)
    for bad in (torch.tensor([0, 0, 3]), torch.tensor([-1, 2]), torch.tensor([3, 50])):
        model = ntkgp.LinearizedGP(net, _likelihood(1, 0.1), x, y.reshape(-1), solver=Inducing(selection=bad))
        with pytest.raises(ValueError, match="inducing indices"):
            model.log_evidence()
    model = ntkgp.LinearizedGP(net, _likelihood(1, 0.1), x, y.reshape(-1), solver=Inducing(num_inducing=0))
    with pytest.raises(ValueError, match="num_inducing"):
        model.log_evidence()
    model = ntkgp.LinearizedGP(net, _likelihood(1, 0.1), x, y.reshape(-1), solver=Inducing(5, selection="grid"))
    with pytest.raises(ValueError, match="selection"):
        model.log_evidence()


def test_ill_conditioned_kzz_gets_more_jitter_with_a_warning() -> None:
    import types

    from ntkgp.solvers.inducing import InducingSolver
    from ntkgp.solvers.inducing.caches import _EXTRA_JITTER

    gen = torch.Generator().manual_seed(0)
    m = 60
    q = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    kzz = q @ torch.diag(torch.logspace(0, -12, m, dtype=torch.float64)) @ q.T  # condition number 1e12
    cross = torch.randn(m, 5000, generator=gen, dtype=torch.float64)
    phi = 1e6 * (kzz @ cross) @ (kzz @ cross).T  # K_ZX K_XZ / sigma^2, low noise
    lz0 = torch.linalg.cholesky(kzz + 1e-8 * kzz.diagonal().mean() * torch.eye(m, dtype=torch.float64))
    a0 = torch.linalg.solve_triangular(lz0, torch.linalg.solve_triangular(lz0, phi, upper=False).T, upper=False)
    assert torch.linalg.cholesky_ex(0.5 * (a0 + a0.T) + torch.eye(m, dtype=torch.float64))[1] > 0  # the failure
    fake = types.SimpleNamespace(inducing_size=m)
    kzz_jittered = kzz + 1e-8 * kzz.diagonal().mean() * torch.eye(m, dtype=torch.float64)
    with pytest.warns(UserWarning, match="too ill-conditioned"):
        lz, a, lb = InducingSolver._factors(fake, kzz_jittered, phi)
    extra = [
        e
        for e in _EXTRA_JITTER
        if e
        and torch.allclose(
            lz @ lz.T, kzz_jittered + e * kzz.diagonal().mean() * torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-12
        )
    ]
    assert len(extra) == 1  # L_Z factors K_ZZ plus one rung of the ladder
    assert torch.allclose(lb @ lb.T, a + torch.eye(m, dtype=torch.float64), rtol=1e-10)
    expected = torch.linalg.solve_triangular(lz, torch.linalg.solve_triangular(lz, phi, upper=False).T, upper=False)
    assert torch.allclose(a, 0.5 * (expected + expected.T))
