"""ntkgp as a BoTorch surrogate: posteriors, gradients, noise, outputs, conditioning, fantasies, optimize_acqf.

Truths: the GP's own exact joint posterior (tested against brute force elsewhere), a brute-force
weight-space GLM predictive differentiated by ``torch.autograd`` (``test_input_gradients.py``), and
a LinearizedGP rebuilt on the conditioned data. Skipped when BoTorch is not installed.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
import truth

import ntkgp

pytest.importorskip("botorch")

from botorch.acquisition import LogExpectedImprovement, UpperConfidenceBound  # noqa: E402
from botorch.acquisition.logei import qLogNoisyExpectedImprovement  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.posteriors.gpytorch import GPyTorchPosterior  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from test_input_gradients import brute_predictive  # noqa: E402

from ntkgp.botorch import LinearizedGPModel  # noqa: E402

TOL = 1e-9


def _model(c: int = 1, solver: str = "kernel", n: int = 30) -> tuple[LinearizedGPModel, torch.Tensor, torch.Tensor]:
    x, y = truth.toy_regression(n, 3, c, seed=1)
    x = torch.sigmoid(x)  # in the unit cube, as BoTorch's inputs
    net = truth.mlp(3, 10 if solver == "kernel" else 3, c, seed=2).eval()
    if c == 1:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=c, has_task_noise=False).double()
    lik.noise = 0.05
    gp = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=2.0, solver=solver)
    return LinearizedGPModel(gp), x, y


@pytest.mark.parametrize("c,solver", [(1, "kernel"), (2, "weight")])
def test_posterior_is_the_joint_gp_posterior_and_differentiable(c: int, solver: str) -> None:
    model, x, y = _model(c, solver)
    X = torch.rand(3, 2, 3, dtype=torch.float64, requires_grad=True)
    post = model.posterior(X)
    assert isinstance(post, GPyTorchPosterior) and model.num_outputs == c
    assert post.mean.shape == (3, 2, c) and post.variance.shape == (3, 2, c)
    mean, cov = brute_predictive(model.model.network.module, x, y, X.reshape(6, 3), 2.0, 0.05)
    blocks = torch.stack([cov[b * 2 * c : (b + 1) * 2 * c, b * 2 * c : (b + 1) * 2 * c] for b in range(3)])
    got_cov = post.mvn.covariance_matrix
    assert float((post.mean.reshape(6, c) - mean).abs().max()) <= 1e-7 * float(mean.abs().max())
    assert float((got_cov - blocks).abs().max()) <= 1e-7 * float(blocks.abs().max())
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(post.mean.shape, generator=g, dtype=torch.float64), torch.randn(3, 2 * c, 2 * c, generator=g)
    got = torch.autograd.grad((post.mean * w1).sum() + (got_cov * w2.double()).sum(), X)[0]
    want = torch.autograd.grad((mean.reshape(3, 2, c) * w1).sum() + (blocks * w2.double()).sum(), X)[0]
    assert float((got - want).abs().max()) <= 1e-7 * float(want.abs().max())


def test_posterior_puts_every_module_in_eval_mode() -> None:
    """``posterior`` switches to eval mode a model left in train mode, or a part of it (the likelihood)."""
    model, _, _ = _model(1)
    X = torch.rand(2, 2, 3, dtype=torch.float64)
    assert model.model.training
    first = model.posterior(X).mean
    assert not any(m.training for m in model.modules())
    model.model.likelihood.train()
    assert torch.equal(model.posterior(X).mean, first)
    assert not any(m.training for m in model.modules())


def test_observation_noise_and_output_indices() -> None:
    model, _, _ = _model(2)
    X = torch.rand(4, 2, 3, dtype=torch.float64)
    plain, noisy = model.posterior(X), model.posterior(X, observation_noise=True)
    noise = float(model.model.likelihood.noise)
    assert torch.allclose(noisy.variance - plain.variance, torch.full_like(plain.variance, noise), atol=1e-12)
    given = model.posterior(X, observation_noise=torch.full((4, 2, 2), 0.3, dtype=torch.float64))
    assert torch.allclose(given.variance - plain.variance, torch.full_like(plain.variance, 0.3), atol=1e-12)
    one = model.posterior(X, output_indices=[1])
    assert one.mean.shape == (4, 2, 1)
    assert torch.allclose(one.mean[..., 0], plain.mean[..., 1], atol=0)
    assert torch.allclose(one.variance[..., 0], plain.variance[..., 1], atol=0)


def test_condition_on_observations_and_fantasies_equal_rebuilt_models() -> None:
    model, x, y = _model(1)
    Z, Y = torch.rand(2, 3, dtype=torch.float64), torch.randn(3, 2, 1, dtype=torch.float64)
    X = torch.rand(4, 3, dtype=torch.float64)
    rebuilt = []
    for s in range(3):
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
        lik.noise = 0.05
        gp = ntkgp.LinearizedGP(
            model.model.network.module, lik, torch.cat([x, Z]), torch.cat([y, Y[s, :, 0]]), prior_precision=2.0
        )
        rebuilt.append(LinearizedGPModel(gp).posterior(X))
    single = model.condition_on_observations(Z, Y[0]).posterior(X)  # one set: a rank-2 update of the factor
    batch = model.condition_on_observations(Z, Y)  # three sets: exact conditioning per batch
    assert batch.batch_shape == (3,)
    post = batch.posterior(X)
    for s, ref in enumerate(rebuilt):
        assert float((post.mean[s] - ref.mean).abs().max()) <= TOL
        assert float((post.mvn.covariance_matrix[s] - ref.mvn.covariance_matrix).abs().max()) <= TOL
    assert float((single.mean - rebuilt[0].mean).abs().max()) <= TOL
    assert float((single.mvn.covariance_matrix - rebuilt[0].mvn.covariance_matrix).abs().max()) <= TOL
    fantasy = model.fantasize(torch.rand(2, 2, 3, dtype=torch.float64), SobolQMCNormalSampler(torch.Size([4])))
    assert fantasy.batch_shape == (4, 2)
    assert fantasy.posterior(torch.rand(5, 1, 1, 1, 3, dtype=torch.float64)).mean.shape == (5, 4, 2, 1, 1)


def test_optimize_acqf_with_analytic_and_monte_carlo_acquisitions() -> None:
    model, x, y = _model(1)
    bounds = torch.stack([torch.zeros(3), torch.ones(3)]).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for acq, q in (
            (LogExpectedImprovement(model, best_f=y.max()), 1),
            (UpperConfidenceBound(model, beta=2.0), 1),
            (qLogNoisyExpectedImprovement(model, x, cache_root=False), 2),
        ):
            torch.manual_seed(0)
            cand, value = optimize_acqf(acq, bounds, q=q, num_restarts=2, raw_samples=16, options={"maxiter": 20})
            assert cand.shape == (q, 3) and torch.isfinite(value).all()
            assert ((cand >= 0) & (cand <= 1)).all()


def test_laplace_gps_give_latent_posteriors_and_refuse_noise_and_conditioning() -> None:
    x, y = truth.toy_regression(30, 3, seed=1)
    gp = ntkgp.LinearizedGP(
        truth.mlp(3, 6, 3).eval(), ntkgp.likelihoods.SoftmaxLikelihood(num_classes=3), x, (y > 0).long()
    )
    model = LinearizedGPModel(gp)
    assert model.posterior(torch.rand(2, 2, 3, dtype=torch.float64)).mean.shape == (2, 2, 3)
    with pytest.raises(ValueError, match="latent"):
        model.posterior(torch.rand(2, 3, dtype=torch.float64), observation_noise=True)
    with pytest.raises(NotImplementedError, match="MAP"):
        model.condition_on_observations(torch.rand(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
