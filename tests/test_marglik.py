"""The subset-NTK evidence bound: exact with one subset, a lower bound otherwise, unbiased minibatches."""

from __future__ import annotations

import gpytorch
import pytest
import torch
import torch.nn.functional as F
import truth

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
    net, x, y = model.network.module, model.train_inputs[0], model.train_targets
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
