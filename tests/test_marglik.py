"""The subset-NTK evidence bound: exact with one subset, a lower bound otherwise, unbiased minibatches."""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
import torch.nn.functional as F
import truth
from gpytorch.constraints import Positive

import ntkgp
from ntkgp.likelihoods import SoftmaxLikelihood
from ntkgp.marglik import SubsetEvidenceBound, class_partition, random_partition


def _regression_model():
    x, y = truth.toy_regression(60, 3, seed=41)
    net = truth.mlp(3, 10, 1, seed=42)
    prior = truth.prior_vector(net, [0.5, 2.0, 1.0, 3.0])
    truth.train_map(net, x, y, prior, 0.04)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.tensor(0.04, dtype=torch.float64)
    return ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision=torch.tensor([0.5, 2.0, 1.0, 3.0]))


def _classification_model():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(45, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    net = truth.mlp(2, 6, 3, seed=7)
    truth.train_map_loss(net, x, lambda f: F.cross_entropy(f, y, reduction="sum"), truth.prior_vector(net, 1.0))
    return ntkgp.LinearizedGP(net.eval(), SoftmaxLikelihood(num_classes=3), x, y, prior_precision=1.0)


@pytest.mark.parametrize("make", [_regression_model, _classification_model])
def test_one_subset_is_the_evidence_and_partitions_bound_it(make) -> None:
    model = make()
    full = SubsetEvidenceBound(model, [torch.arange(model.num_data)])()
    assert abs(float(full - model.log_evidence())) <= 1e-8 * abs(float(full))  # at a tight MAP
    for size in (30, 15, 5, 1):  # Fischer's inequality: every partition bounds the full evidence
        parts = random_partition(model.num_data, size, generator=torch.Generator().manual_seed(0))
        assert float(SubsetEvidenceBound(model, parts)()) < float(full)


def test_minibatch_estimates_are_unbiased() -> None:
    model = _regression_model()
    bound = SubsetEvidenceBound(model, random_partition(model.num_data, 12, generator=torch.Generator().manual_seed(1)))
    params = [model.covar_module.raw_prior_precision, model.likelihood.noise_covar.raw_noise]
    value = bound()
    grads = torch.autograd.grad(value, params)
    estimates = [bound.minibatch(i) for i in range(bound.num_subsets)]
    mean = torch.stack(estimates).mean()
    assert torch.allclose(mean, value, rtol=1e-12)
    est_grads = [torch.autograd.grad(e, params) for e in estimates]
    for k in range(2):
        avg = torch.stack([g[k] for g in est_grads]).mean(0)
        assert torch.allclose(avg, grads[k], rtol=1e-10)


def test_class_partition_groups_classes() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    parts = class_partition(labels, 2, generator=torch.Generator().manual_seed(0))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    mixed = sum(len(set(labels[p].tolist())) > 1 for p in parts)
    assert mixed <= 2  # only where one class's run ends and the next begins


def test_class_grouped_bound_against_brute_force_blocks() -> None:
    model = _classification_model()
    parts = class_partition(model.train_targets, 9, generator=torch.Generator().manual_seed(2))
    value = float(SubsetEvidenceBound(model, parts)())
    # brute force: block-diagonal log-determinant with autograd Hessians, independent of ntkgp
    net, x, y = model.network.module, model.train_x.data, model.train_targets
    with torch.no_grad():
        out = net(x)
    hessians = truth.nll_hessians(lambda v, n: -torch.log_softmax(v, -1)[y[n]], out)
    prior = truth.prior_vector(net, 1.0)
    theta = truth.flat_params(net)
    expected = -F.cross_entropy(out, y, reduction="sum") - 0.5 * (prior * theta.square()).sum()
    for p in parts:
        j = truth.jacobian(net, x[p])
        lam = torch.block_diag(*hessians[p])
        expected = expected - 0.5 * (torch.logdet(j.T @ lam @ j + torch.diag(prior)) - prior.log().sum())
    assert abs(value - float(expected)) <= 1e-9 * abs(float(expected))


def test_bad_partition() -> None:
    model = _regression_model()
    with pytest.raises(ValueError, match="partition"):
        SubsetEvidenceBound(model, [torch.arange(10)])


def test_online_marglik_regression_reaches_the_post_hoc_evidence_optimum() -> None:
    """Online-tuned (delta, noise) against the exact evidence optimum of the final network."""
    x, y = truth.toy_regression(80, 3, seed=51)  # noise sd 0.1
    net = truth.mlp(3, 16, 1, seed=52)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.tensor(1.0, dtype=torch.float64)
    seen = []
    result = ntkgp.marglik.fit_online_marglik(
        net,
        lik,
        x,
        y,
        prior_precision=1.0,
        epochs=300,
        lr=1e-2,
        marglik_every=20,
        burnin=20,
        steps=20,
        hyper_lr=0.2,
        progress=False,
        callback=lambda epoch, record: seen.append(epoch),
    )
    assert seen == list(range(300))
    assert len([r for r in result.history if "log_evidence_after" in r]) == 14  # epochs 20, 40, ..., 280
    post_hoc = gpytorch.likelihoods.GaussianLikelihood().double()
    post_hoc.noise = lik.noise.detach().clone()
    model = ntkgp.LinearizedGP(net, post_hoc, x, y, prior_precision=result.prior_precision)
    at_tuner = float(model.log_evidence())
    opt = torch.optim.LBFGS(list(model.parameters()), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -model.log_evidence()
        loss.backward()
        return loss

    opt.step(closure)
    optimum = float(model.log_evidence())
    assert optimum - at_tuner < 0.05  # nats; the noise went from 1.0 to near the optimum's
    assert abs(float(lik.noise) / float(post_hoc.noise) - 1) < 0.1
    assert abs(float(result.prior_precision) / float(model.prior_precision) - 1) < 0.1


def test_log_space_tuner_switches_groups_off_and_matches_the_evidence_truth() -> None:
    """With an exp/log constraint, Adam steps move log(delta): a group the evidence wants off gets
    far beyond what additive softplus steps reach, and the reported evidence is the brute-force one."""
    x, y = truth.toy_regression(60, 3, seed=81)
    y = y - y.mean()
    net = truth.mlp(3, 8, 1, seed=82)
    log_space = Positive(transform=torch.exp, inv_transform=torch.log)
    finals = {}
    for name, constraint in [("softplus", None), ("log", log_space)]:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
        lik.noise = torch.tensor(0.05, dtype=torch.float64)
        tuner = ntkgp.marglik.MarglikTuner(
            net, lik, x, y, prior_precision=torch.ones(4), steps=40, lr=0.3, prior_precision_constraint=constraint
        )
        record = tuner.step(net)
        finals[name] = tuner.prior_precision.detach()
        noise_rows = torch.full((60,), float(lik.noise), dtype=torch.float64)
        prior = truth.prior_vector(net, finals[name].tolist())
        brute = float(truth.log_evidence(net, x, y, prior, noise_rows))
        assert abs(record["log_evidence_after"] - brute) <= 1e-8 * abs(brute)
    assert torch.allclose(
        ntkgp.marglik.MarglikTuner(
            net, lik, x, y, prior_precision=torch.full((4,), 3.0), prior_precision_constraint=log_space
        ).raw_prior_precision,
        torch.full((4,), math.log(3.0), dtype=torch.float64),
    )
    # 40 steps of 0.3: softplus moves a large delta by at most ~12, log space by a factor up to e^12
    assert finals["log"].max() > 10 * finals["softplus"].max()


def test_prior_penalty_follows_the_precisions() -> None:
    """prior_penalty caches delta as numbers; it must see every change (a step, or an in-place edit)."""
    x, y = truth.toy_regression(40, 3, seed=1)
    net = truth.mlp(3, 6, 1, seed=2)
    tuner = ntkgp.marglik.MarglikTuner(
        net,
        gpytorch.likelihoods.GaussianLikelihood().double(),
        x,
        y,
        prior_precision=torch.tensor([1.0, 2.0, 3.0, 4.0]),
        steps=2,
    )

    def penalty() -> torch.Tensor:
        delta = tuner.prior_precision.detach()
        return sum(0.5 * delta[g] * p.square().sum() for g, p in zip(tuner.groups.tensor_group, net.parameters()))

    values = [tuner.prior_penalty(net)]
    assert torch.allclose(values[-1], penalty(), rtol=1e-14)
    tuner.step(net)
    values.append(tuner.prior_penalty(net))
    with torch.no_grad():
        tuner.raw_prior_precision.add_(0.5)
    values.append(tuner.prior_penalty(net))
    assert torch.allclose(values[-1], penalty(), rtol=1e-14)
    assert len({round(float(v), 10) for v in values}) == 3


def test_tuner_in_a_custom_loop_with_the_subset_bound() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(120, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * torch.randn(120, generator=g, dtype=torch.float64) > 0).long()
    net = truth.mlp(2, 8, 2, seed=10)
    lik = SoftmaxLikelihood(num_classes=2)
    tuner = ntkgp.marglik.MarglikTuner(
        net,
        lik,
        x,
        y,
        prior_precision=torch.ones(4),
        steps=5,
        subset_size=30,
        generator=torch.Generator().manual_seed(0),
    )
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for epoch in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y, reduction="sum") + tuner.prior_penalty(net)
        loss.backward()
        opt.step()
        if epoch % 20 == 19:
            record = tuner.step(net)
            assert record["log_evidence_after"] >= record["log_evidence_before"] - 1e-6
    assert len(tuner.history) == 3 and tuner.prior_precision.shape == (4,)
    assert not torch.equal(tuner.prior_precision.detach(), torch.ones(4, dtype=torch.float64))


def test_gaussian_subset_tuner_needs_no_training_mean(monkeypatch) -> None:
    """The subset bound uses the network's residuals; the noise is read without the GP mean's jvp pass."""
    x, y = truth.toy_regression(40, 3, seed=71)
    net = truth.mlp(3, 6, 1, seed=72)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    means = []
    real_mean = ntkgp.means.linearized_mean.LinearizedMean.forward
    monkeypatch.setattr(
        ntkgp.means.linearized_mean.LinearizedMean, "forward", lambda *a, **k: means.append(1) or real_mean(*a, **k)
    )
    tuner = ntkgp.marglik.MarglikTuner(
        net, lik, x, y, steps=2, subset_size=10, minibatch=True, generator=torch.Generator().manual_seed(0)
    )
    record = tuner.step(net)
    assert means == [] and math.isfinite(record["log_evidence_after"])


def test_train_map_and_fit_hyperparameters() -> None:
    x, y = truth.toy_regression(50, 3, seed=61)
    net = truth.mlp(3, 8, 1, seed=62)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.tensor(0.05, dtype=torch.float64)
    spec = torch.tensor([0.5, 2.0, 1.0, 3.0])
    grad_norm = ntkgp.marglik.train_map(net, lik, x, y, spec, adam_steps=300, lbfgs_steps=500)
    assert grad_norm < 1e-6
    # the MAP of the GP's own objective: the linearized posterior mean is the network's output
    model = ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision=spec).eval()
    with torch.no_grad():
        assert torch.allclose(model(x).mean, net(x)[:, 0], atol=1e-6)
    curve = ntkgp.marglik.fit_hyperparameters(model, steps=50, lr=0.1).curve  # the former Adam route
    assert len(curve) == 50 and curve[-1] > curve[0]
    assert not model.training


def test_tuner_subset_mode_never_builds_the_exact_solver_and_handles_large_precisions(monkeypatch) -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    net = truth.mlp(2, 5, 2, seed=12)
    built = []
    real = ntkgp.models.linearized_gp.make_laplace_solver
    monkeypatch.setattr(
        ntkgp.models.linearized_gp, "make_laplace_solver", lambda *a, **k: built.append(1) or real(*a, **k)
    )
    tuner = ntkgp.marglik.MarglikTuner(
        net,
        SoftmaxLikelihood(num_classes=2),
        x,
        y,
        prior_precision=1000.0,
        steps=3,
        subset_size=20,
        minibatch=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isclose(tuner.prior_precision, torch.tensor(1000.0, dtype=torch.float64), rtol=1e-12)
    grams, means = [], []
    real_gram = ntkgp.marglik.subset_bound.ntk_gram
    monkeypatch.setattr(ntkgp.marglik.subset_bound, "ntk_gram", lambda *a, **k: grams.append(1) or real_gram(*a, **k))
    real_mean = ntkgp.means.linearized_mean.LinearizedMean.forward
    monkeypatch.setattr(
        ntkgp.means.linearized_mean.LinearizedMean, "forward", lambda *a, **k: means.append(1) or real_mean(*a, **k)
    )
    record = tuner.step(net)
    assert built == [] and len(tuner.history) == 1
    assert record["log_evidence_before"] < 0 and torch.isfinite(tuner.prior_precision).all()
    # one subset per step: one Gram for the Adam steps and both reports; no training mean
    assert grams == [1] and means == []
