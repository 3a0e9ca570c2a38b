"""Adding observations without a rebuild: equal to a LinearizedGP rebuilt on all the data, to 1e-9.

The truth is ntkgp's own rebuilt model (whose exactness against brute force is tested in
``test_against_truth.py``) and, for the linear algebra, ``torch.linalg.cholesky`` and ``torch.linalg.solve``
of the updated matrices.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
import truth
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import ntkgp
from ntkgp.linalg.bordered import MAX_DEPTH, BorderedCholesky
from ntkgp.linalg.cholesky_update import cholesky_update
from ntkgp.linalg.factor import factor_logdet, factor_solve, lower_solve
from ntkgp.linalg.woodbury import MAX_RANK, WoodburyFactor
from ntkgp.models.samples import posterior_samples
from ntkgp.network.functional import FunctionalNetwork
from ntkgp.structured.chain import DenseChain

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
    """Predictive mean and covariance, batched joint posteriors and the evidence equal the rebuilt model's."""
    model.eval(), ref.eval()
    with torch.no_grad():
        a, b = model(x_test), ref(x_test)
        assert _close(a.mean, b.mean)
        assert _close(a.covariance_matrix, b.covariance_matrix)
        batched = x_test[: 2 * (x_test.shape[0] // 2)].reshape(-1, 2, x_test.shape[1])  # groups of q = 2
        a, b = model(batched), ref(batched)
        assert a.batch_shape == (x_test.shape[0] // 2,)
        assert _close(a.mean, b.mean)
        assert _close(a.covariance_matrix, b.covariance_matrix)
        assert abs(float(model.log_evidence() - ref.log_evidence())) <= TOL * abs(float(ref.log_evidence()))


def _agree_samples(model: ntkgp.LinearizedGP, ref: ntkgp.LinearizedGP, x_test: torch.Tensor) -> None:
    """Pathwise samples: the same functions as the rebuilt model's for the same seed in kernel space (Matheron's
    rule solves with the extended factor); in weight space the same weights' mean and covariance
    (:math:`\bar\theta + T^{-\top}z` with another square root :math:`T` of the same precision)."""
    post, ref_post = model.posterior(), ref.posterior()
    if isinstance(post, ntkgp.posteriors.WeightSpacePosterior):
        assert isinstance(ref_post, ntkgp.posteriors.WeightSpacePosterior)
        eye = torch.eye(post.weights.shape[0], dtype=torch.float64)
        root, ref_root = post.draw(eye) - post.weights, ref_post.draw(eye) - ref_post.weights  # rows: T^-1 columns
        assert _close(post.weights, ref_post.weights)
        assert _close(root.T @ root, ref_root.T @ ref_root)  # T^-T T^-1 = A^-1
    else:
        a = posterior_samples(model, 7, generator=torch.Generator().manual_seed(3))(x_test)
        b = posterior_samples(ref, 7, generator=torch.Generator().manual_seed(3))(x_test)
        assert _close(a, b)


class _NewTensors(TorchDispatchMode):
    """Records the shapes of the tensors with at least ``size`` elements that an operation creates (its outputs
    that share storage with none of its inputs: views and in-place results are not new), and the side of
    every triangular solve with a matrix of at least ``size`` elements."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.created, self.solves = size, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket is torch.ops.aten.linalg_solve_triangular and args[0].numel() >= self.size:
            self.solves.append(args[0].shape[-1])
        out = func(*args, **(kwargs or {}))
        leaves = pytree.tree_leaves((args, kwargs))
        held = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.size and t.untyped_storage().data_ptr() not in held:
                self.created.append((str(func), tuple(t.shape)))
        return out


def _count_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of examples of every evaluation of the network from now on: its functional calls (forward,
    jvp, vjp, Jacobians, captures) and the closed-form captures of a plain MLP."""
    seen: list[int] = []
    call, capture = FunctionalNetwork.call, DenseChain.capture

    def counted_call(self, params, x, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(x.num)
        return call(self, params, x, **kwargs)

    def counted_capture(self, params, x):  # type: ignore[no-untyped-def]
        seen.append(x.shape[0])
        return capture(self, params, x)

    monkeypatch.setattr(FunctionalNetwork, "call", counted_call)
    monkeypatch.setattr(DenseChain, "capture", counted_capture)
    return seen


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
    else:  # the old factor and the new rows in Woodbury form: the brute-force precision's solves
        factor = fantasy.solver.woodbury
        assert isinstance(factor, WoodburyFactor) and factor.rank == 10 * c
        j = truth.jacobian(net, x)
        noise = fantasy.likelihood.noise.detach().reshape(())  # 0.05 as rounded by the likelihood's setter
        precision = j.T @ j / noise + 2.0 * torch.eye(j.shape[1], dtype=torch.float64)
        b = torch.randn(j.shape[1], 3, dtype=torch.float64)
        assert _close(factor_solve(factor, b), torch.linalg.solve(precision, b))
        assert _close(factor_logdet(factor), torch.logdet(precision))
        assert _close(factor.dense(), torch.linalg.cholesky(precision))
    model.add_data(x[36:41], y[36:41]).add_data(x[41:], y[41:])
    if solver == "weight":  # two updates: one factor with both sets of columns
        assert model.solver.woodbury.rank == 10 * c and model.solver.woodbury.base is factor.base
    ref = ntkgp.LinearizedGP(net, _likelihood(c), x, y, prior_precision=2.0, solver=solver)
    _agree(model, ref, x_test)
    _agree(fantasy, ref, x_test)
    _agree_samples(model, ref, x_test)
    _agree_samples(fantasy, ref, x_test)


def _evidence_gradients(model: ntkgp.LinearizedGP) -> torch.Tensor:
    model.train()
    model.zero_grad()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    (-mll(model(model.train_x.data), model.train_targets)).backward()
    return torch.cat([model.covar_module.raw_prior_precision.grad, model.likelihood.raw_noise.grad.reshape(-1)])


@pytest.mark.parametrize("solver,c", [("kernel", 1), ("weight", 1), ("weight", 2)])
@pytest.mark.parametrize("moved", [False, True])
def test_add_data_then_evidence_gradients_here_and_at_other_hyperparameters(solver: str, c: int, moved: bool) -> None:
    """The evidence and its gradient in delta and the noise equal the rebuilt model's, at the hyperparameters of
    the update (weight space: the dense factor made from the Woodbury one) and at others."""
    net, x, y = _case(c, solver)
    model = ntkgp.LinearizedGP(net, _likelihood(c), x[:40], y[:40], prior_precision=2.0, solver=solver)
    model.posterior()
    model.add_data(x[40:], y[40:])
    ref = ntkgp.LinearizedGP(net, _likelihood(c), x, y, prior_precision=2.0, solver=solver)
    if moved:
        for m in (model, ref):
            m.prior_precision = 3.0
            m.likelihood.noise = 0.02
    x_test = torch.randn(4, 3, dtype=torch.float64)
    _agree(model, ref, x_test)
    assert _close(_evidence_gradients(model), _evidence_gradients(ref))
    _agree(model, ref, x_test)  # and again after the gradients (dense matrices now held)


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


@pytest.mark.parametrize("solver,c", [("kernel", 1), ("weight", 1), ("weight", 2)])
def test_input_gradients_after_add_data_equal_the_rebuilt_models(solver: str, c: int) -> None:
    """Gradients in the test inputs of the mean, the variances and a batched joint covariance (the factor's solves
    with Jacobians that carry a graph) equal the rebuilt model's."""
    net, x, y = _case(c, solver)
    model = ntkgp.LinearizedGP(net, _likelihood(c), x[:36], y[:36], prior_precision=2.0, solver=solver).eval()
    model.posterior()
    model.add_data(x[36:], y[36:])
    ref = ntkgp.LinearizedGP(net, _likelihood(c), x, y, prior_precision=2.0, solver=solver).eval()
    grads = []
    for m in (model, ref):
        x_test = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
        out, joint = m(x_test), m(x_test.reshape(3, 2, 3))
        (out.mean.sum() + out.variance.sum() + joint.covariance_matrix.sum()).backward()
        grads.append(x_test.grad)
    assert _close(grads[0], grads[1])


@pytest.mark.parametrize("p,ranks", [(40, (3, 5)), (30, (MAX_RANK - 2, 5)), (25, (4,))])
def test_woodbury_factor_against_dense_linear_algebra(p: int, ranks: tuple[int, ...]) -> None:
    """Solves, whitening, draws' covariance and log-determinant of stacked low-rank terms (folded past
    ``MAX_RANK``), with an update much larger than the base (ill-scaled) among them."""
    g = torch.Generator().manual_seed(p)
    a = torch.randn(p, p + 3, generator=g, dtype=torch.float64)
    a = a @ a.T / p + 0.1 * torch.eye(p, dtype=torch.float64)
    factor: torch.Tensor | WoodburyFactor = torch.linalg.cholesky(a)
    for i, k in enumerate(ranks):
        u = torch.randn(p, k, generator=g, dtype=torch.float64) * (100.0 if i == 0 else 1.0)
        factor = WoodburyFactor.extend(factor, u)
        a = a + u @ u.T
    assert isinstance(factor, WoodburyFactor)
    assert factor.rank == (ranks[-1] if sum(ranks) > MAX_RANK else sum(ranks))  # folded into a dense base
    b = torch.randn(p, 4, generator=g, dtype=torch.float64)
    assert _close(factor_solve(factor, b), torch.linalg.solve(a, b))
    v = lower_solve(factor, b)
    assert _close(v.T @ v, b.T @ torch.linalg.solve(a, b))
    assert abs(float(factor_logdet(factor) - torch.logdet(a))) <= TOL * abs(float(torch.logdet(a)))
    assert _close(factor.dense(), torch.linalg.cholesky(a))


@pytest.mark.parametrize("solver", ["weight", "kernel"])
@pytest.mark.parametrize("between", [False, True])
def test_updates_create_no_matrix_of_the_old_size_and_pass_only_over_the_new_points(
    solver: str, between: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two add_data calls (with or without a posterior between), the posterior and a prediction make no new
    ``P x P`` tensor in weight space and no new ``M x M`` tensor in kernel space, and run the network on the
    new and test points only; in kernel space a posterior after an update solves once with the factor."""
    x, y = truth.toy_regression(60, 3, seed=1)
    x_test = torch.randn(5, 3, dtype=torch.float64)
    net = truth.mlp(3, 12, 1, seed=2).eval()
    model = ntkgp.LinearizedGP(net, _likelihood(1), x[:50], y[:50], prior_precision=2.0, solver=solver).eval()
    model.posterior()
    with torch.no_grad():
        _ = model(x_test).covariance_matrix  # the test points' captures are not what is counted
    size = model.network.num_parameters if solver == "weight" else 50
    assert size**2 > 20 * 60  # larger than anything made for the new, test or all points
    with monkeypatch.context() as patch:
        passes = _count_passes(patch)
        with _NewTensors(size * size) as created, torch.no_grad():
            model.add_data(x[50:55], y[50:55])
            if between:
                model.posterior()
            model.add_data(x[55:], y[55:])
            start = len(created.solves)
            model.posterior()
            solves = created.solves[start:]
            out = model(x_test)
            mean, cov = out.mean, out.covariance_matrix
    assert created.created == [], created.created
    assert passes and max(passes) <= 5, passes
    if solver == "kernel" and between:  # L^-1 r of the old rows kept: one backward solve
        assert len(solves) == 1, solves
    ref = ntkgp.LinearizedGP(net, _likelihood(1), x, y, prior_precision=2.0, solver=solver).eval()
    with torch.no_grad():
        want = ref(x_test)
        assert _close(mean, want.mean) and _close(cov, want.covariance_matrix)


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
