"""The CG / BBMM route: preconditioned CG, stochastic Lanczos quadrature and LOVE variances.

Truths: the exact kernel-space solver (Cholesky of the dense NTK) and brute-force weight-space
linear algebra (``truth.py``). Small float64 nets; every random quantity is seeded.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
import truth
from builders import make_problem

import ntkgp
from ntkgp.linalg.cg import conjugate_gradients, lanczos_tridiagonal
from ntkgp.linalg.lanczos_decomposition import lanczos_decomposition
from ntkgp.linalg.preconditioner import LowRankPlusDiagonal, pivoted_cholesky
from ntkgp.linalg.slq import gauss_quadrature_log
from ntkgp.memory import default_budget
from ntkgp.solvers.conjugate_gradients import CGSolver, ConjugateGradients
from ntkgp.solvers.kernel_space import KernelSpaceSolver

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def spd(m: int, seed: int = 0, decay: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    return (q * decay ** torch.arange(m, dtype=F64) * 10) @ q.T + 1e-3 * torch.eye(m, dtype=F64)


def make_solvers(
    n: int = 50, hidden: int = 16, c: int = 1, spec: ConjugateGradients | None = None, seed: int = 0
) -> tuple[CGSolver, KernelSpaceSolver, torch.Tensor, torch.Tensor]:
    """CG and exact solvers on one net (P > N C), two prior groups per layer; a residual ``(M,)``."""
    x, y = truth.toy_regression(n, 3, c, seed=seed)
    net = truth.mlp(3, hidden, c, seed=seed + 1).eval()
    problem = make_problem(net, x, torch.tensor([1.0, 2.0, 0.5, 3.0]), budget=default_budget(x.device))
    cg = (spec or ConjugateGradients()).gaussian(problem)
    exact = KernelSpaceSolver(problem)
    residual = y.reshape(-1).to(F64) - problem.network.forward(problem.x).reshape(-1).to(F64)
    return cg, exact, problem.layout.initial_precision.clone(), residual


# ---------------------------------------------------------------- linear algebra pieces
def test_preconditioned_cg_solves_and_reports_true_residuals() -> None:
    A = spd(80)
    rhs = torch.randn(80, 3, dtype=F64)
    rhs[:, 1] = 0  # a zero right-hand side converges at once
    L = pivoted_cholesky(A.diagonal(), lambda idx: A[:, idx], 10)
    P = LowRankPlusDiagonal(L, torch.full((80,), 1e-3, dtype=F64))
    res = conjugate_gradients(lambda v: A @ v, rhs, precondition=P.solve, tolerance=1e-10, max_iterations=500)
    exact = torch.linalg.solve(A, rhs)
    assert res.converged and res.max_residual <= 1e-10
    assert int(res.iterations[1]) == 0 and float(res.solution[:, 1].abs().max()) == 0
    true = (rhs - A @ res.solution).norm(dim=0) / rhs.norm(dim=0).clamp_min(1e-300)
    # the recomputed residual is ~1e-10 |b| while rounding in b - A x is ~eps |A| |x| ~ 1e-13 |b|
    assert torch.allclose(res.residuals, true, rtol=1e-2, atol=0)
    assert rel_err(res.solution, exact) < 1e-7


def test_low_rank_plus_diagonal_inverse_root_and_logdet_are_exact() -> None:
    g = torch.Generator().manual_seed(1)
    L = torch.randn(30, 6, generator=g, dtype=F64)
    s = torch.rand(30, generator=g, dtype=F64) + 0.1
    P = L @ L.T + torch.diag(s)
    pre = LowRankPlusDiagonal(L, s)
    w = torch.randn(30, 4, generator=g, dtype=F64)
    assert rel_err(pre.solve(w), torch.linalg.solve(P, w)) < 1e-12
    R = pre.root(torch.eye(30, dtype=F64))
    assert rel_err(R @ R.T, P) < 1e-12
    assert rel_err(pre.root_inv_t(w), torch.linalg.solve(R.T, w)) < 1e-12
    assert abs(float(pre.logdet() - torch.logdet(P))) < 1e-10


def test_full_rank_pivoted_cholesky_reproduces_the_matrix() -> None:
    A = spd(40, decay=0.5) - 1e-3 * torch.eye(40, dtype=F64)  # numerically low rank
    L = pivoted_cholesky(A.diagonal(), lambda idx: A[:, idx], 40, block=7)
    assert rel_err(L @ L.T, A) < 1e-8
    partial = pivoted_cholesky(A.diagonal(), lambda idx: A[:, idx], 40, trace_tol=1e-3)
    assert float((A - partial @ partial.T).diagonal().sum()) <= 1e-3 and partial.shape[1] < 40


def test_cg_lanczos_coefficients_give_the_spectrum_and_exact_quadrature() -> None:
    A = spd(25, decay=0.8)
    w = torch.zeros(25, 1, dtype=F64)
    w[3] = 1.0
    res = conjugate_gradients(lambda v: A @ v, w, tolerance=1e-14, max_iterations=200)
    T = lanczos_tridiagonal(res.step_sizes[:, 0], res.updates[:, 0], int(res.iterations[0]))
    values, vectors = torch.linalg.eigh(A)
    exact = (vectors[3].square() * values.log()).sum()
    assert abs(float(gauss_quadrature_log(T) - exact)) < 1e-8


def test_lanczos_decomposition_full_basis_inverts_and_restarts_on_breakdown() -> None:
    low = torch.randn(30, 5, dtype=F64)
    A = low @ low.T + 0.1 * torch.eye(30, dtype=F64)  # Krylov space of a vector has dimension <= 6
    Q, T = lanczos_decomposition(
        lambda v: A @ v, torch.randn(30, dtype=F64), 30, generator=torch.Generator().manual_seed(0)
    )
    assert rel_err(Q.T @ Q, torch.eye(30, dtype=F64)) < 1e-12
    assert rel_err(Q @ torch.linalg.solve(T, Q.T), torch.linalg.inv(A)) < 1e-10
    # a zero start vector is replaced by a random one
    Q, T = lanczos_decomposition(
        lambda v: A @ v, torch.zeros(30, dtype=F64), 30, generator=torch.Generator().manual_seed(1)
    )
    assert rel_err(Q.T @ Q, torch.eye(30, dtype=F64)) < 1e-12
    assert rel_err(Q @ torch.linalg.solve(T, Q.T), torch.linalg.inv(A)) < 1e-10


# ------------------------------------------------------------------ the solver, evidence
def test_inv_quad_matches_exact_to_the_tolerance_with_a_weak_preconditioner() -> None:
    spec = ConjugateGradients(preconditioner_rank=8, tolerance=1e-10)
    cg, exact, delta, r = make_solvers(spec=spec)
    noise = torch.full((cg.size,), 1e-2, dtype=F64)
    rhs = torch.stack([r, torch.randn_like(r)], -1)
    iq, _ = cg.inv_quad_logdet(delta, noise, rhs, False)
    iq0, _ = exact.inv_quad_logdet(delta, noise, rhs, False)
    info = cg.last_info
    assert info is not None and info.converged and info.max_residual <= 1e-10 and info.iterations > 10
    assert info.preconditioner_rank == 8
    assert rel_err(iq, iq0) < 1e-10
    assert rel_err(cg.solve(delta, noise, rhs), exact.solve(delta, noise, rhs)) < 1e-8


def test_logdet_with_basis_probes_is_deterministic_and_exact() -> None:
    cg, exact, delta, r = make_solvers(spec=ConjugateGradients(probes="basis", preconditioner_rank=5))
    noise = torch.full((cg.size,), 1e-2, dtype=F64)
    _, ld = cg.inv_quad_logdet(delta, noise, None, True)
    _, ld0 = exact.inv_quad_logdet(delta, noise, None, True)
    assert abs(float(ld - ld0)) < 1e-6 * abs(float(ld0))


def test_slq_logdet_is_within_its_stated_standard_error() -> None:
    spec = ConjugateGradients(num_probes=128, preconditioner_rank=8, seed=3)
    cg, exact, delta, r = make_solvers(spec=spec)
    noise = torch.full((cg.size,), 1e-2, dtype=F64)
    _, ld = cg.inv_quad_logdet(delta, noise, None, True)
    _, ld0 = exact.inv_quad_logdet(delta, noise, None, True)
    se = cg.last_info.logdet_std_error
    assert 0 < se < 0.05 * abs(float(ld0))  # the estimate is informative
    assert abs(float(ld - ld0)) < 4 * se
    # the same seed gives the same estimate (common random numbers across evaluations)
    assert float(cg.inv_quad_logdet(delta, noise, None, True)[1]) == float(ld)


def _evidence_grads(solver, delta: torch.Tensor, noise: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d, s = delta.clone().requires_grad_(True), noise.clone().requires_grad_(True)
    iq, ld = solver.inv_quad_logdet(d, s, r.unsqueeze(-1), True)
    iq_grads = torch.autograd.grad(iq.sum(), (d, s), retain_graph=True)
    ld_grads = torch.autograd.grad(ld, (d, s))
    return (*iq_grads, *ld_grads)


def test_evidence_gradients_match_exact() -> None:
    cg, exact, delta, r = make_solvers(spec=ConjugateGradients(probes="basis", preconditioner_rank=5))
    noise = torch.linspace(0.01, 0.03, cg.size, dtype=F64)
    for got, want in zip(_evidence_grads(cg, delta, noise, r), _evidence_grads(exact, delta, noise, r)):
        assert rel_err(got, want) < 1e-7


def test_stochastic_logdet_gradients_are_unbiased_within_their_error() -> None:
    cg, exact, delta, r = make_solvers(spec=ConjugateGradients(preconditioner_rank=8))
    noise = torch.full((cg.size,), 1e-2, dtype=F64)
    want_delta, want_noise = _evidence_grads(exact, delta, noise, r)[2:]
    draws = []
    for seed in range(8):
        cg.spec = ConjugateGradients(preconditioner_rank=8, seed=seed)
        gd, gn = _evidence_grads(cg, delta, noise, r)[2:]
        draws.append(torch.cat([gd, gn.sum().reshape(1)]))
    draws_t = torch.stack(draws)  # shape: (8, G + 1)
    mean, se = draws_t.mean(0), draws_t.std(0) / 8**0.5
    want = torch.cat([want_delta, want_noise.sum().reshape(1)])
    assert ((mean - want).abs() < 4 * se + 1e-10).all(), (mean, want, se)
    # informative: the standard error of each prior-precision gradient is small next to that gradient vector
    assert (se[:-1] < 0.05 * want[:-1].norm()).all() and se[-1] < 0.05 * want[-1].abs()


# ------------------------------------------------------------------ posterior
@pytest.mark.parametrize("c", [1, 2])
def test_posterior_mean_and_full_rank_love_variances_are_exact(c: int) -> None:
    cg, exact, delta, r = make_solvers(n=30, c=c, spec=ConjugateGradients(preconditioner_rank=4))
    noise = torch.full((cg.size,), 0.05, dtype=F64)
    x_test, _ = truth.toy_regression(7, 3, seed=5)
    post, post0 = cg.posterior(delta, noise, r), exact.posterior(delta, noise, r)
    assert cg.last_info.variance_rank == cg.size  # default variance_rank >= M: the full basis
    assert rel_err(post.weights, post0.weights) < 1e-8
    assert rel_err(post.mean(x_test), post0.mean(x_test)) < 1e-8
    assert rel_err(post.covariance(x_test), post0.covariance(x_test)) < 1e-8


def test_truncated_love_variances_are_conservative_and_improve_with_rank() -> None:
    cg, exact, delta, r = make_solvers(n=60, hidden=24)
    noise = torch.full((cg.size,), 1e-2, dtype=F64)
    x_test, _ = truth.toy_regression(20, 3, seed=6)
    v0 = exact.posterior(delta, noise, r).covariance_diagonal(x_test)
    errors = []
    for k in (10, 30, 60):
        cg.spec = ConjugateGradients(variance_rank=k)
        v = cg.posterior(delta, noise, r).covariance_diagonal(x_test)
        assert (v >= v0 - 1e-10 * v0.abs().max()).all()  # Q T^{-1} Q^T <= A^{-1}
        errors.append(float(((v - v0) / v0).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8, errors


def test_low_noise_ntk_is_accurate_with_the_defaults() -> None:
    """Noise 1e-4, N = 300, P = 321: the NTK spectrum falls through the noise level near rank
    250 (GPyTorch's CG defaults gave 68x variance errors on such a kernel). The adaptive
    pivoted-Cholesky rank keeps CG to a few iterations; mean, evidence and variances are exact
    to ~1e-7 against the dense Cholesky and the brute-force weight-space posterior."""
    n, noise_value = 300, 1e-4
    x, y = truth.toy_regression(n, 3, seed=11)
    net = truth.mlp(3, 64, 1, seed=12).eval()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.tensor(noise_value, dtype=F64)
    model = ntkgp.LinearizedGP(net, lik, x, y, solver=ConjugateGradients()).eval()
    exact = ntkgp.LinearizedGP(net, lik, x, y, solver="kernel").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default tolerance is reached
        evidence = model.log_evidence()
    info = model.solver.last_info
    assert info.converged and info.iterations < 100, info
    # evidence = -(inv_quad + logdet + M log 2 pi) / 2: its error is half the SLQ error
    assert abs(float(evidence.detach() - exact.log_evidence().detach())) < 4 * info.logdet_std_error / 2 + 1e-6
    x_test, _ = truth.toy_regression(40, 3, seed=13)
    with torch.no_grad():
        pred, pred0 = model(x_test), exact(x_test)
    assert rel_err(pred.mean, pred0.mean) < 1e-6
    assert float(((pred.variance - pred0.variance) / pred0.variance).abs().max()) < 1e-6
    j, jt = truth.jacobian(net, x), truth.jacobian(net, x_test)
    brute = truth.posterior_covariance(j, jt, truth.prior_vector(net, 1.0), torch.full((n,), noise_value)).diagonal()
    assert float(((pred.variance - brute) / brute).abs().max()) < 1e-5


def test_tolerance_not_reached_warns_and_reports_the_residual() -> None:
    cg, _, delta, r = make_solvers(spec=ConjugateGradients(preconditioner_rank=0, max_iterations=3))
    noise = torch.full((cg.size,), 1e-3, dtype=F64)
    with pytest.warns(UserWarning, match="did not reach the relative residual"):
        cg.inv_quad_logdet(delta, noise, r.unsqueeze(-1), True)
    info = cg.last_info
    assert not info.converged and info.iterations == 3 and info.max_residual > info.tolerance


def test_dense_matmul_diagonal_agree_with_exact_and_laplace_is_refused() -> None:
    cg, exact, delta, r = make_solvers(n=20)
    noise = torch.full((cg.size,), 0.1, dtype=F64)
    v = torch.randn(cg.size, 3, dtype=F64)
    assert rel_err(cg.dense(delta, noise), exact.dense(delta, noise)) < 1e-12
    assert rel_err(cg.matmul(delta, noise, v), exact.matmul(delta, noise, v)) < 1e-12
    assert rel_err(cg.diagonal(delta, noise), exact.diagonal(delta, noise)) < 1e-12
    with pytest.raises(NotImplementedError, match="inducing"):
        ConjugateGradients().laplace(cg.problem, torch.ones(20, 1, 1))
    with pytest.raises(ValueError):
        ConjugateGradients(probes="gaussian")


def test_solve_is_differentiable() -> None:
    cg, exact, delta, r = make_solvers(n=20, spec=ConjugateGradients(preconditioner_rank=2, tolerance=1e-12))
    noise = torch.full((cg.size,), 0.1, dtype=F64)
    grads = []
    for solver in (cg, exact):
        d, s = delta.clone().requires_grad_(True), noise.clone().requires_grad_(True)
        out = solver.solve(d, s, r.unsqueeze(-1))
        grads.append(torch.autograd.grad((out.square()).sum(), (d, s)))
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-7


# ------------------------------------------------------------------ GPyTorch loop
def test_gpytorch_training_loop_and_prediction() -> None:
    x, y = truth.toy_regression(40, 3, seed=21)
    net = truth.mlp(3, 16, 1, seed=22).eval()
    models = []
    for solver in (ConjugateGradients(probes="basis"), "kernel"):
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
        model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=torch.ones(4), solver=solver)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        model.train()
        lik.train()
        for _ in range(5):
            opt.zero_grad()
            loss = -mll(model(x), y)
            loss.backward()
            opt.step()
        model.eval()
        lik.eval()
        models.append(model)
    cg_model, exact_model = models
    assert rel_err(cg_model.prior_precision.detach(), exact_model.prior_precision.detach()) < 1e-6
    x_test, _ = truth.toy_regression(8, 3, seed=23)
    with torch.no_grad():
        pred, pred0 = cg_model.likelihood(cg_model(x_test)), exact_model.likelihood(exact_model(x_test))
    assert rel_err(pred.mean, pred0.mean) < 1e-6
    assert rel_err(pred.variance, pred0.variance) < 1e-6
