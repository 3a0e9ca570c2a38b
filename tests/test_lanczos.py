"""The Lanczos low-rank route (``ntkgp.solvers.lanczos``) against independent float64 truths.

Truths come from brute-force Jacobians (``truth.jacobian``) and dense eigendecompositions of
:math:`B^\\top K B`; nothing here trusts ntkgp's own exact solvers.

* full rank (``k = N C``): evidence, posterior mean and covariance equal the exact GP / GGN Laplace;
* ``k < N C``: top eigenvalues match the dense truth; the predictive variance is conservative and its
  error shrinks with ``k``; the log-determinant is a lower bound; the posterior equals the exact
  posterior given the data projected on the true top-``k`` eigenvectors;
* gradients in the prior precisions and the noise: exact at full rank, equal to finite differences
  for one prior group, equal to the projected approximation's gradient for several groups;
* the GPyTorch loop (ExactMarginalLogLikelihood, Adam, eval, ``likelihood(model(x))``).
"""

from __future__ import annotations

import math
from functools import cache

import gpytorch
import pytest
import torch
import torch.nn.functional as F
import truth
from torch import Tensor

import ntkgp
from ntkgp.likelihoods import SoftmaxLikelihood
from ntkgp.linalg.block_lanczos import block_lanczos
from ntkgp.solvers.lanczos import Lanczos, LanczosLaplaceSolver, LanczosSolver

NOISE = 0.05
PRIORS = {"scalar": 1.5, "per_tensor": [0.5, 2.0, 1.0, 4.0]}


def _per_parameter(net: torch.nn.Module, delta: Tensor) -> Tensor:
    """``(G,)`` per-tensor (G = 4) or scalar (G = 1) precisions -> ``(P,)``, differentiable."""
    counts = torch.tensor([p.numel() for p in net.parameters()])
    if delta.numel() == 1:
        return delta.expand(int(counts.sum()))
    return delta.repeat_interleave(counts)


def _spec(kind: str) -> float | Tensor:
    value = PRIORS[kind]
    return value if isinstance(value, float) else torch.tensor(value, dtype=torch.float64)


# ----------------------------------------------------------------------------- problems
@cache
def regression() -> tuple:
    x, y = truth.toy_regression(30, 3, 1, seed=1)
    net = truth.mlp(3, 8, 1, seed=2).eval()  # P = 41 > N = 30
    truth.train_map(net, x, y, truth.prior_vector(net, 1.0), NOISE, iters=2)
    x_test = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return net, x, y, x_test, truth.jacobian(net, x), truth.jacobian(net, x_test)


@cache
def classification() -> tuple:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(25, 2, dtype=torch.float64, generator=gen)
    y = (x @ torch.randn(2, 3, dtype=torch.float64, generator=gen)).argmax(-1)
    x_test = torch.randn(6, 2, dtype=torch.float64, generator=gen)
    net = truth.mlp(2, 5, 3, seed=6).eval()  # P = 33 < N C = 75: B^T K B is rank deficient
    prior = truth.prior_vector(net, 1.0)
    grad = truth.train_map_loss(net, x, lambda f: F.cross_entropy(f, y, reduction="sum"), prior)
    assert grad < 1e-8
    with torch.no_grad():
        out = net(x)
    hessians = truth.nll_hessians(lambda v, n: -torch.log_softmax(v, -1)[y[n]], out)
    log_lik = -F.cross_entropy(out, y, reduction="sum")
    return net, x, y, x_test, hessians, log_lik


def gaussian_model(solver, kind: str = "per_tensor", noise: float = NOISE) -> ntkgp.LinearizedGP:
    net, x, y, *_ = regression()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.tensor(noise, dtype=torch.float64)
    return ntkgp.LinearizedGP(net, lik, x, y, prior_precision=_spec(kind), solver=solver)


def laplace_model(solver, kind: str = "per_tensor") -> ntkgp.LinearizedGP:
    net, x, y, *_ = classification()
    return ntkgp.LinearizedGP(net, SoftmaxLikelihood(num_classes=3), x, y, prior_precision=_spec(kind), solver=solver)


def gaussian_truth(kind: str) -> dict[str, Tensor]:
    """Dense float64 GP truths for the regression problem."""
    net, x, y, x_test, j, j_test = regression()
    prior = truth.prior_vector(net, PRIORS[kind])
    noise = torch.full((x.shape[0],), NOISE, dtype=torch.float64)
    theta = truth.flat_params(net)
    with torch.no_grad():
        f, f_test = net(x).reshape(-1), net(x_test).reshape(-1)
    kernel = j @ (j / prior).T
    residual = y - (f - j @ theta)
    alpha = torch.linalg.solve(kernel + NOISE * torch.eye(len(y), dtype=torch.float64), residual)
    cross = j_test @ (j / prior).T  # shape: (n*, N)
    values, vectors = torch.linalg.eigh(kernel)
    return {
        "evidence": truth.log_evidence(net, x, y, prior, noise),
        "mean": f_test - j_test @ theta + cross @ alpha,
        "covariance": truth.posterior_covariance(j, j_test, prior, noise),
        "prior_test": j_test @ (j_test / prior).T,
        "cross": cross,
        "kernel": kernel,
        "residual": residual,
        "prior_mean_test": f_test - j_test @ theta,
        "eigenvalues": values.flip(0),
        "eigenvectors": vectors.flip(1),
    }


def _sqrt_psd(blocks: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(blocks)
    return vectors @ torch.diag_embed(values.clamp_min(0).sqrt()) @ vectors.mT


def laplace_operator(delta: Tensor) -> Tensor:
    r""":math:`H^{1/2} K(\delta) H^{1/2}`, spectrum of :math:`B^\top K B` for any :math:`BB^\top = H`."""
    net, x, _, _, hessians, _ = classification()
    j = truth.jacobian(net, x)
    root = torch.block_diag(*_sqrt_psd(hessians))
    return root @ (j / _per_parameter(net, delta)) @ j.T @ root


# ----------------------------------------------------------------------------- block Lanczos
def test_block_lanczos_on_a_dense_rank_deficient_matrix() -> None:
    gen = torch.Generator().manual_seed(0)
    factor = torch.randn(50, 12, dtype=torch.float64, generator=gen) * torch.logspace(0, -3, 12, dtype=torch.float64)
    matrix = factor @ factor.T  # rank 12 < 50: the Krylov space becomes invariant, refills needed
    calls = []

    def matmul(v: Tensor) -> Tensor:
        calls.append(v.shape[1])
        return matrix @ v

    values, vectors = block_lanczos(matmul, 50, 50, block_size=7, num_steps=8, generator=gen)
    assert sum(calls) == 50  # one product per basis column, none for Rayleigh-Ritz
    exact = torch.linalg.eigvalsh(matrix).flip(0)
    assert torch.allclose(values, exact, rtol=0, atol=1e-12 * float(exact[0]))
    assert torch.allclose(vectors.T @ vectors, torch.eye(50, dtype=torch.float64), atol=1e-12)
    top, top_vectors = block_lanczos(lambda v: matrix @ v, 50, 5, block_size=3, num_steps=6, generator=gen)
    assert torch.allclose(top, exact[:5], rtol=1e-10, atol=0)
    rayleigh = top_vectors.T @ matrix @ top_vectors
    assert torch.allclose(rayleigh, torch.diag(top), rtol=0, atol=1e-12 * float(exact[0]))
    with pytest.raises(ValueError, match="rank"):
        block_lanczos(lambda v: matrix @ v, 50, 30, block_size=4, num_steps=5, generator=gen)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="rank"):
        Lanczos(rank=0)
    with pytest.raises(ValueError, match="block_size"):
        Lanczos(rank=5, block_size=2.5)
    with pytest.raises(ValueError, match="mean"):
        Lanczos(rank=5, mean="exact")
    with pytest.raises(ValueError, match="num_steps"):
        Lanczos(rank=20, block_size=4, num_steps=3).settings(100)
    assert Lanczos(rank=500).settings(30) == (30, 4, 8)  # the rank is clipped to N C
    assert Lanczos(rank=40, block_size=8).settings(1000) == (40, 8, 10)  # a basis of 2 k
    assert Lanczos(rank=40).settings(1000) == (40, 5, 16)
    assert Lanczos(rank=500).settings(10_000) == (500, 32, 32)


# ----------------------------------------------------------------------------- full rank: exact
@pytest.mark.parametrize("mean", ["projected", "complement"])
@pytest.mark.parametrize("kind", list(PRIORS))
def test_full_rank_gaussian_is_exact(kind: str, mean: str) -> None:
    want = gaussian_truth(kind)
    _, x, _, x_test, *_ = regression()
    model = gaussian_model(Lanczos(rank=30, block_size=8, mean=mean), kind)
    assert isinstance(model.solver, LanczosSolver) and not model.solver.exact
    evidence = float(model.log_evidence().detach())
    assert abs(evidence - float(want["evidence"])) <= 1e-9 * abs(float(want["evidence"]))
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    assert abs(float(mll(model(x), model.train_targets).detach()) * 30 - evidence) <= 1e-10 * abs(evidence)
    model.eval()
    post = model.posterior()
    scale = float(want["prior_test"].diagonal().max())
    assert torch.allclose(post.mean(x_test).reshape(-1), want["mean"], rtol=0, atol=1e-9 * scale)
    assert torch.allclose(post.covariance(x_test), want["covariance"], rtol=0, atol=1e-9 * scale)
    assert torch.allclose(post.covariance_diagonal(x_test), want["covariance"].diagonal(), rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("kind", list(PRIORS))
def test_full_rank_laplace_is_exact(kind: str) -> None:
    net, x, y, x_test, hessians, log_lik = classification()
    prior = truth.prior_vector(net, PRIORS[kind])
    evidence, covariance = truth.ggn_laplace(net, x, x_test, hessians, prior, log_lik)
    model = laplace_model(Lanczos(rank=75, block_size=16), kind)
    assert isinstance(model.solver, LanczosLaplaceSolver)
    model.train()
    mll = ntkgp.mlls.LaplaceMarginalLogLikelihood(model.likelihood, model)
    got = float(mll(model(x), y).detach()) * x.shape[0]
    assert abs(got - float(evidence)) <= 1e-9 * abs(float(evidence))
    model.eval()
    post = model.posterior()
    scale = float(covariance.diagonal().max())
    assert torch.allclose(post.covariance(x_test), covariance, rtol=0, atol=1e-9 * scale)
    blocks = post.covariance_blocks(x_test)
    assert torch.allclose(
        torch.block_diag(*blocks), covariance * torch.block_diag(*torch.ones(6, 3, 3)), rtol=0, atol=1e-9 * scale
    )
    with torch.no_grad():
        assert torch.allclose(post.mean(x_test), net(x_test), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- k < N C
@pytest.mark.parametrize("kind", list(PRIORS))
def test_top_eigenvalues_match_the_dense_truth(kind: str) -> None:
    want = gaussian_truth(kind)["eigenvalues"]
    model = gaussian_model(Lanczos(rank=10, block_size=3, num_steps=8), kind)
    delta = model.prior_precision.detach()
    dec = model.solver.decomposition(delta)
    got = dec.eigenvalues(delta)
    assert torch.allclose(got, want[:10], rtol=1e-8, atol=0)
    assert torch.allclose(dec.ritz_values, got, rtol=1e-12, atol=0)

    laplace = laplace_model(Lanczos(rank=12, block_size=6), kind)
    delta = laplace.prior_precision.detach()
    exact = torch.linalg.eigvalsh(laplace_operator(delta)).flip(0)
    got = laplace.solver.decomposition(delta).eigenvalues(delta)
    assert torch.allclose(got, exact[:12], rtol=1e-8, atol=0)


@pytest.mark.parametrize("kind", list(PRIORS))
def test_gaussian_low_rank_equals_the_projected_data_posterior(kind: str) -> None:
    """At rank k the route is the exact posterior given U_k^T y (U_k the true top eigenvectors)."""
    want = gaussian_truth(kind)
    _, x, _, x_test, *_ = regression()
    k = 12
    u, lam = want["eigenvectors"][:, :k], want["eigenvalues"][:k]
    inner = u / (lam + NOISE)
    covariance = want["prior_test"] - want["cross"] @ inner @ u.T @ want["cross"].T
    mean = want["prior_mean_test"] + want["cross"] @ inner @ (u.T @ want["residual"])
    quad = ((u.T @ want["residual"]).square() / (lam + NOISE)).sum()
    quad = quad + (want["residual"] - u @ (u.T @ want["residual"])).square().sum() / NOISE
    log_det = (lam + NOISE).log().sum() + (30 - k) * math.log(NOISE)
    evidence = -0.5 * (quad + log_det + 30 * math.log(2 * math.pi))

    model = gaussian_model(Lanczos(rank=k, block_size=3, num_steps=9), kind)
    assert abs(float(model.log_evidence().detach()) - float(evidence)) <= 1e-8 * abs(float(evidence))
    post = model.eval().posterior()
    scale = float(want["prior_test"].diagonal().max())
    assert torch.allclose(post.covariance(x_test), covariance, rtol=0, atol=1e-8 * scale)
    assert torch.allclose(post.mean(x_test).reshape(-1), mean, rtol=0, atol=1e-8 * scale)


@pytest.mark.parametrize("kind", list(PRIORS))
def test_gaussian_low_rank_is_conservative_and_improves_with_rank(kind: str) -> None:
    want = gaussian_truth(kind)
    _, x, _, x_test, *_ = regression()
    exact_var = want["covariance"].diagonal()
    exact_log_det = torch.logdet(want["kernel"] + NOISE * torch.eye(30, dtype=torch.float64))
    errors, gaps = [], []
    for k in (1, 2, 4, 8, 16, 24, 30):
        model = gaussian_model(Lanczos(rank=k, block_size=min(k, 4)), kind)
        delta, noise = model.prior_precision.detach(), model.noise_diagonal().detach()
        log_det = model.solver.inv_quad_logdet(delta, noise, None, True)[1]
        gaps.append(float(exact_log_det - log_det))
        var = model.eval().posterior().covariance_diagonal(x_test)
        errors.append(var - exact_var)
    scale = float(want["prior_test"].diagonal().max())
    for err in errors:
        assert float(err.min()) >= -1e-10 * scale  # never under-estimates the variance
    worst = [float(err.max()) for err in errors]
    assert all(b <= a + 1e-10 * scale for a, b in zip(worst, worst[1:])), worst
    assert worst[0] > 1e-2 * scale and worst[-1] <= 1e-9 * scale
    assert all(g >= -1e-9 for g in gaps), gaps  # the log-determinant is a lower bound
    assert all(b <= a + 1e-9 for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[0] > 1.0 and abs(gaps[-1]) <= 1e-9


def test_laplace_low_rank_is_conservative_and_improves_with_rank() -> None:
    net, x, y, x_test, hessians, log_lik = classification()
    prior = truth.prior_vector(net, PRIORS["per_tensor"])
    _, covariance = truth.ggn_laplace(net, x, x_test, hessians, prior, log_lik)
    delta = torch.tensor(PRIORS["per_tensor"], dtype=torch.float64)
    exact_log_det = torch.logdet(torch.eye(75, dtype=torch.float64) + laplace_operator(delta))
    scale = float(covariance.diagonal().max())
    worst, gaps = [], []
    for k in (1, 3, 6, 12, 24, 33):  # rank(B^T K B) <= P = 33
        model = laplace_model(Lanczos(rank=k, block_size=min(k, 6)))
        gaps.append(float(exact_log_det - model.solver.log_det(delta)))
        err = model.eval().posterior().covariance_diagonal(x_test) - covariance.diagonal()
        assert float(err.min()) >= -1e-10 * scale
        worst.append(float(err.max()))
    assert all(b <= a + 1e-10 * scale for a, b in zip(worst, worst[1:])), worst
    assert worst[0] > 1e-2 * scale and worst[-1] <= 1e-9 * scale
    assert all(g >= -1e-9 for g in gaps) and all(b <= a + 1e-9 for a, b in zip(gaps, gaps[1:])), gaps
    assert abs(gaps[-1]) <= 1e-9


# ----------------------------------------------------------------------------- gradients
def _solver_evidence(solver: LanczosSolver, residual: Tensor, delta: Tensor, sigma2: Tensor) -> Tensor:
    noise = sigma2.expand(solver.size)
    inv_quad, log_det = solver.inv_quad_logdet(delta, noise, residual.unsqueeze(-1), True)
    return -0.5 * (inv_quad.sum() + log_det + solver.size * math.log(2 * math.pi))


def _truth_evidence(delta: Tensor, sigma2: Tensor, vectors: Tensor | None = None) -> Tensor:
    """Exact GP evidence, or (with ``vectors`` U) that of U (U^T K U) U^T + sigma2 I, by autograd."""
    net, x, y, _, j, _ = regression()
    residual = y - (net(x).detach().reshape(-1) - j @ truth.flat_params(net))
    kernel = j @ (j / _per_parameter(net, delta)).T
    if vectors is not None:
        kernel = vectors @ (vectors.T @ kernel @ vectors) @ vectors.T
    cov = kernel + sigma2 * torch.eye(len(y), dtype=torch.float64)
    return torch.distributions.MultivariateNormal(torch.zeros_like(residual), cov).log_prob(residual)


@pytest.mark.parametrize("kind", list(PRIORS))
@pytest.mark.parametrize("rank", [30, 9])
def test_gaussian_gradients(kind: str, rank: int) -> None:
    model = gaussian_model(Lanczos(rank=rank, block_size=3), kind)
    solver, residual = model.solver, model.residual()
    delta = model.prior_precision.detach().clone().requires_grad_(True)
    sigma2 = torch.tensor(NOISE, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(_solver_evidence(solver, residual, delta, sigma2), (delta, sigma2))
    vectors = None if rank == 30 else solver.decomposition(delta).vectors
    want = torch.autograd.grad(_truth_evidence(delta, sigma2, vectors), (delta, sigma2))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-10 * float(w.abs().max()))
    if delta.numel() == 1:  # one group: one decomposition serves every delta; finite differences
        step = 1e-5
        for i, base in enumerate((delta.detach(), sigma2.detach())):
            values = []
            for sign in (1, -1):
                moved = base * (1 + sign * step)
                args = (moved, sigma2.detach()) if i == 0 else (delta.detach(), moved)
                values.append(float(_solver_evidence(solver, residual, *args)))
            fd = (values[0] - values[1]) / (2 * step * float(base.reshape(-1)[0]))
            assert abs(float(got[i].reshape(-1)[0]) - fd) <= 1e-6 * abs(fd)
        assert solver.num_decompositions == 1


@pytest.mark.parametrize("kind", list(PRIORS))
@pytest.mark.parametrize("rank", [75, 10])
def test_laplace_log_det_gradient(kind: str, rank: int) -> None:
    model = laplace_model(Lanczos(rank=rank, block_size=5), kind)
    delta = model.prior_precision.detach().clone().requires_grad_(True)
    got = torch.autograd.grad(model.solver.log_det(delta), delta)[0]
    operator = laplace_operator(delta)  # exact: log|I + B^T K B| = log|I + H^{1/2} K H^{1/2}|
    if rank < 75:
        # the projected log-det log|I + U^T B^T K B U|, in the solver's coordinates (its B and
        # H^{1/2} differ by an orthogonal factor per point); check B B^T = H first
        net, x, _, _, hessians, _ = classification()
        factor = model.solver.hessian_root
        assert torch.allclose(factor @ factor.mT, hessians, rtol=0, atol=1e-12)
        u, b, j = model.solver.decomposition(delta).vectors, torch.block_diag(*factor), truth.jacobian(net, x)
        operator = u.T @ b.T @ (j / _per_parameter(net, delta)) @ j.T @ b @ u
    size = operator.shape[0]
    want = torch.autograd.grad(torch.logdet(torch.eye(size, dtype=torch.float64) + operator), delta)[0]
    assert torch.allclose(got, want, rtol=1e-8, atol=0)


# ----------------------------------------------------------------------------- GPyTorch loop
def test_gpytorch_training_loop_and_prediction() -> None:
    net, x, y, x_test, *_ = regression()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    model = ntkgp.LinearizedGP(
        net,
        lik,
        x,
        y,
        prior_precision=torch.ones(4, dtype=torch.float64),
        solver=Lanczos(rank=12, block_size=4),
        progress=True,
    )
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    lik.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert model.solver.num_decompositions >= 8  # one per new direction of delta (4 groups)
    model.eval()
    lik.eval()
    with torch.no_grad():
        pred = lik(model(x_test))
        post = model.posterior()
        assert torch.allclose(pred.mean, post.mean(x_test).reshape(-1), atol=1e-10)
        want = post.covariance_diagonal(x_test) + lik.noise.reshape(-1)
        assert torch.allclose(pred.variance, want, rtol=1e-8)

    classes = classification()
    lap = laplace_model(Lanczos(rank=10, block_size=5))
    mll = ntkgp.mlls.LaplaceMarginalLogLikelihood(lap.likelihood, lap)
    opt = torch.optim.Adam(lap.parameters(), lr=0.1)
    lap.train()
    opt.zero_grad()
    (-mll(lap(classes[1]), classes[2])).backward()
    assert torch.isfinite(lap.covar_module.raw_prior_precision.grad).all()
    opt.step()
    lap.eval()
    with torch.no_grad():
        probs = lap.likelihood(lap(classes[3])).probs
    assert torch.allclose(probs.sum(-1), torch.ones(6, dtype=torch.float64))


# ----------------------------------------------------------------------------- noise that varies
# S = I_N (x) diag(s_c) (MultitaskGaussianLikelihood with per-task noise) or any diagonal (per-point
# FixedNoise). The route is the exact GP given U^T y: truths are dense float64 formulas from brute-force
# Jacobians, the exact GP at k = N C, and the projected-data GP with the solver's U at k < N C.
TASK_NOISE = {"unequal": (0.02, 0.2), "equal": (0.05, 0.05)}


@cache
def two_outputs() -> tuple:
    x, y = truth.toy_regression(15, 3, 2, seed=7)
    net = truth.mlp(3, 6, 2, seed=8).eval()  # P = 38 > N C = 30
    truth.train_map(net, x, y, truth.prior_vector(net, 1.0), torch.tensor(TASK_NOISE["unequal"]), iters=2)
    x_test = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    return net, x, y, x_test, truth.jacobian(net, x), truth.jacobian(net, x_test)


def per_task_model(solver, kind: str, task_noise: tuple[float, float]) -> ntkgp.LinearizedGP:
    net, x, y, *_ = two_outputs()
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=0, has_global_noise=False).double()
    lik.task_noises = torch.tensor(task_noise, dtype=torch.float64)
    return ntkgp.LinearizedGP(net, lik, x, y, prior_precision=_spec(kind), solver=solver)


POINT_NOISE = torch.linspace(0.01, 0.1, 30, dtype=torch.float64)


def per_point_model(solver, kind: str) -> ntkgp.LinearizedGP:
    net, x, y, *_ = regression()
    lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=POINT_NOISE).double()
    return ntkgp.LinearizedGP(net, lik, x, y, prior_precision=_spec(kind), solver=solver)


def _problem(noise: str) -> tuple:
    """``(net, x, y, x_test, J, J_test, residual)`` of the problem the noise kind is tested on."""
    net, x, y, x_test, j, j_test = two_outputs() if noise == "per_task" else regression()
    with torch.no_grad():
        residual = y.reshape(-1) - (net(x).reshape(-1) - j @ truth.flat_params(net))
    return net, x, y, x_test, j, j_test, residual


def _noise_vector(noise: str, values: Tensor) -> Tensor:
    """The diagonal of S ``(N C,)``: per-task ``values`` ``(2,)`` repeated over points, or per point."""
    return values.repeat(15) if noise == "per_task" else values


def _model(noise: str, solver, kind: str) -> ntkgp.LinearizedGP:
    if noise == "per_task":
        return per_task_model(solver, kind, TASK_NOISE["unequal"])
    return per_point_model(solver, kind)


def _noise_values(model: ntkgp.LinearizedGP) -> Tensor:
    """The likelihood's noise values: per task ``(2,)`` or per point ``(30,)``."""
    lik = model.likelihood
    return (lik.task_noises if hasattr(lik, "task_noises") else lik.noise).detach().reshape(-1)


def projected_truth(noise: str, delta: Tensor, values: Tensor, vectors: Tensor) -> dict[str, Tensor]:
    """The exact GP given U^T y (U = ``vectors``), dense, differentiable in ``delta`` and ``values``."""
    net, _, _, x_test, j, j_test, residual = _problem(noise)
    prior = _per_parameter(net, delta)
    diag = _noise_vector(noise, values)
    kernel, cross = j @ (j / prior).T, j_test @ (j / prior).T
    proj, inner, projected_noise = (
        vectors.T @ residual,
        vectors.T @ kernel @ vectors,
        vectors.T @ (diag[:, None] * vectors),
    )

    def log_normal(cov: Tensor, value: Tensor) -> Tensor:
        return torch.distributions.MultivariateNormal(torch.zeros_like(value), cov).log_prob(value)

    # log p(U^T y) + log p(y | U^T y) under the noise alone
    evidence = log_normal(inner + projected_noise, proj) + log_normal(torch.diag(diag), residual)
    evidence = evidence - log_normal(projected_noise, proj)
    gain = cross @ vectors @ torch.linalg.inv(inner + projected_noise)  # shape: (n* C, k)
    with torch.no_grad():
        prior_mean = net(x_test).reshape(-1) - j_test @ truth.flat_params(net)
    # the same approximation as one matrix: S U V^-1 (U^T K U) V^-1 U^T S + S
    tilde = diag[:, None] * vectors @ torch.linalg.inv(projected_noise)
    return {
        "evidence": evidence,
        "mean": prior_mean + gain @ proj,
        "covariance": j_test @ (j_test / prior).T - gain @ vectors.T @ cross.T,
        "matrix": tilde @ inner @ tilde.T + torch.diag(diag),
        "exact_log_det": torch.logdet(kernel + torch.diag(diag)),
        "exact_covariance": truth.posterior_covariance(j, j_test, prior, diag),
        "residual": residual,
    }


@pytest.mark.parametrize("noise", ["per_task", "per_point"])
@pytest.mark.parametrize("kind", list(PRIORS))
def test_noise_that_varies_at_full_rank_is_exact(noise: str, kind: str) -> None:
    net, x, y, x_test, j, j_test, _ = _problem(noise)
    prior = truth.prior_vector(net, PRIORS[kind])
    model = _model(noise, Lanczos(rank=30, block_size=8), kind)
    diag = _noise_vector(noise, _noise_values(model))
    assert torch.equal(model.noise_diagonal().detach(), diag)
    want = float(truth.log_evidence(net, x, y, prior, diag))
    assert abs(float(model.log_evidence().detach()) - want) <= 1e-9 * abs(want)
    covariance = truth.posterior_covariance(j, j_test, prior, diag)
    scale = float(covariance.diagonal().max())
    post = model.eval().posterior()
    assert torch.allclose(post.covariance(x_test), covariance, rtol=0, atol=1e-9 * scale)
    with torch.no_grad():
        f, f_test = net(x).reshape(-1), net(x_test).reshape(-1)
    theta = truth.flat_params(net)
    kernel = j @ (j / prior).T
    alpha = torch.linalg.solve(kernel + torch.diag(diag), y.reshape(-1) - (f - j @ theta))
    mean = f_test - j_test @ theta + j_test @ (j / prior).T @ alpha
    assert torch.allclose(post.mean(x_test).reshape(-1), mean, rtol=0, atol=1e-9 * float(mean.abs().max()))


@pytest.mark.parametrize("noise", ["per_task", "per_point"])
@pytest.mark.parametrize("kind", list(PRIORS))
def test_noise_that_varies_at_low_rank_is_the_projected_data_gp(noise: str, kind: str) -> None:
    """Evidence, mean and covariance of the GP given U^T y; log-det a lower bound, variances conservative."""
    _, _, _, x_test, *_ = _problem(noise)
    model = _model(noise, Lanczos(rank=8, block_size=4, mean="projected"), kind)
    delta, diag = model.prior_precision.detach(), model.noise_diagonal().detach()
    vectors = model.solver.decomposition(delta).vectors
    want = projected_truth(noise, delta, _noise_values(model), vectors)
    evidence = float(model.log_evidence().detach())
    assert abs(evidence - float(want["evidence"])) <= 1e-9 * abs(float(want["evidence"]))
    # every method of the solver refers to the one matrix S U V^-1 (U^T K U) V^-1 U^T S + S
    matrix, solver, residual = want["matrix"], model.solver, want["residual"][:, None]
    assert abs(
        evidence
        - float(
            torch.distributions.MultivariateNormal(torch.zeros(30, dtype=torch.float64), matrix).log_prob(
                residual[:, 0]
            )
        )
    ) <= 1e-9 * abs(evidence)
    inv_quad, log_det = solver.inv_quad_logdet(delta, diag, residual, True)
    assert abs(float(log_det) - float(torch.logdet(matrix))) <= 1e-10 * abs(float(log_det))
    assert float(log_det) <= float(want["exact_log_det"]) + 1e-10  # a lower bound for any U
    rhs = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(solver.solve(delta, diag, rhs), torch.linalg.solve(matrix, rhs), rtol=1e-9, atol=0)
    assert torch.allclose(solver.matmul(delta, diag, rhs), matrix @ rhs, rtol=1e-10, atol=1e-12)
    assert torch.allclose(solver.diagonal(delta, diag), matrix.diagonal(), rtol=1e-10, atol=0)
    assert torch.allclose(solver.dense(delta, diag), matrix, rtol=0, atol=1e-12 * float(matrix.abs().max()))
    assert torch.allclose(inv_quad, residual[:, 0] @ torch.linalg.solve(matrix, residual), rtol=1e-10, atol=0)

    # bilinear derivative (linear_operator's backward of products) against autograd of the dense matrix
    left, right = rhs[:, :2], rhs[:, 1:]
    delta_leaf, values = delta.clone().requires_grad_(True), _noise_values(model).clone().requires_grad_(True)
    dense = projected_truth(noise, delta_leaf, values, vectors)["matrix"]
    want_grads = torch.autograd.grad((left * (dense @ right)).sum(), (delta_leaf, values))
    grad_delta, grad_noise = solver.bilinear_derivative(delta, diag, left, right)
    grad_noise = grad_noise.reshape(-1, 2).sum(0) if noise == "per_task" else grad_noise
    for g, w in zip((grad_delta, grad_noise), want_grads):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-10 * float(w.abs().max()))

    post = model.eval().posterior()
    scale = float(want["exact_covariance"].diagonal().max())
    assert torch.allclose(post.covariance(x_test), want["covariance"], rtol=0, atol=1e-9 * scale)
    assert torch.allclose(post.mean(x_test).reshape(-1), want["mean"], rtol=0, atol=1e-9 * scale)
    gap = post.covariance_diagonal(x_test) - want["exact_covariance"].diagonal()
    assert float(gap.min()) >= -1e-10 * scale and float(gap.max()) > 1e-4 * scale  # conservative, not exact


@pytest.mark.parametrize("task_noise", list(TASK_NOISE))
@pytest.mark.parametrize("kind", list(PRIORS))
@pytest.mark.parametrize("rank", [30, 8])
def test_per_task_noise_gradients(task_noise: str, kind: str, rank: int) -> None:
    """Gradients in delta and in each task's noise, through the likelihood, equal the dense truth's
    (with equal task noises too, where the fit starts: each task gets its own gradient)."""
    model = per_task_model(Lanczos(rank=rank, block_size=4), kind, TASK_NOISE[task_noise])
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    evidence = mll(model(model.train_inputs[0]), model.train_targets) * 30  # GPyTorch divides by N C
    got = torch.autograd.grad(evidence, (model.covar_module.raw_prior_precision, model.likelihood.raw_task_noises))
    delta = model.prior_precision.detach().clone().requires_grad_(True)
    values = model.likelihood.task_noises.detach().clone().requires_grad_(True)
    vectors = model.solver.decomposition(delta.detach()).vectors
    want_value = projected_truth(
        "per_task", delta, values, vectors if rank < 30 else torch.eye(30, dtype=torch.float64)
    )
    value = float(evidence.detach())
    assert abs(value - float(want_value["evidence"])) <= 1e-9 * abs(value)
    want = torch.autograd.grad(want_value["evidence"], (delta, values))
    # chain to the raw parameters: d/d raw = d/d value * (value transform)'
    raw_delta = model.covar_module.raw_prior_precision.detach().clone().requires_grad_(True)
    raw_noise = model.likelihood.raw_task_noises.detach().clone().requires_grad_(True)
    constraint = model.likelihood.raw_task_noises_constraint
    links = (model.covar_module.raw_prior_precision_constraint.transform(raw_delta), constraint.transform(raw_noise))
    want_raw = torch.autograd.grad(
        links, (raw_delta, raw_noise), grad_outputs=(want[0].reshape(links[0].shape), want[1].reshape(links[1].shape))
    )
    for g, w in zip(got, want_raw):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-10 * float(w.abs().max()))


def test_per_task_noise_hyperparameter_fit() -> None:
    """The fits that raised NoiseVariesError once the task noises drifted apart: Adam with GPyTorch's
    ExactMarginalLogLikelihood, and ntkgp.marglik.fit_hyperparameters."""
    model = per_task_model(Lanczos(rank=10, block_size=5), "per_tensor", TASK_NOISE["equal"])
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = -mll(model(model.train_inputs[0]), model.train_targets)
        loss.backward()
        assert torch.isfinite(model.likelihood.raw_task_noises.grad).all()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    noises = model.likelihood.task_noises.detach().reshape(-1)
    assert float(noises.max() / noises.min()) > 1.01  # the task noises have drifted apart

    model = per_task_model(Lanczos(rank=10, block_size=5), "scalar", TASK_NOISE["equal"])
    before = float(model.log_evidence().detach())
    fit = ntkgp.marglik.fit_hyperparameters(model)
    assert fit.converged
    noises = model.likelihood.task_noises.detach().reshape(-1)
    assert float(noises.max() / noises.min()) > 1.5
    assert float(model.log_evidence().detach()) > before
    # a stationary point of the dense truth (one prior group: U does not depend on delta)
    delta = model.prior_precision.detach().clone().requires_grad_(True)
    values = noises.clone().requires_grad_(True)
    vectors = model.solver.decomposition(delta.detach()).vectors
    grads = torch.autograd.grad(projected_truth("per_task", delta, values, vectors)["evidence"], (delta, values))
    assert float((grads[0] * delta).abs().max()) < 1e-3 and float((grads[1] * values).abs().max()) < 1e-3
