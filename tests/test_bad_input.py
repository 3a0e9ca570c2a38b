"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import gpytorch
import pytest
import torch
import truth

import ntkgp
from ntkgp.memory import KernelTooLargeError


@pytest.fixture
def setup():
    x, y = truth.toy_regression(12, 3)
    return truth.mlp(3, 5, 1).eval(), gpytorch.likelihoods.GaussianLikelihood().double(), x, y


def test_integer_inputs_to_a_float_network(setup) -> None:
    """Integer inputs are legitimate (token ids); a network that cannot take them is named clearly."""
    net, lik, x, y = setup
    with pytest.raises(ntkgp.NetworkError, match="cannot be evaluated on the inputs.*int64"):
        ntkgp.LinearizedGP(net, lik, x.long(), y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_and_targets(setup, bad) -> None:
    net, lik, x, y = setup
    x2 = x.clone()
    x2[3, 1] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite.*\[3\]"):
        ntkgp.LinearizedGP(net, lik, x2, y)
    y2 = y.clone()
    y2[0] = bad
    with pytest.raises(ValueError, match="train_y contains NaN"):
        ntkgp.LinearizedGP(net, lik, x, y2)


def test_likelihood_on_another_device(setup) -> None:
    """A likelihood left behind when the network moved (here: on the meta device) is named at construction."""
    net, lik, x, y = setup
    with pytest.raises(ValueError, match="the likelihood is on meta but the network is on cpu"):
        ntkgp.LinearizedGP(net, lik.to("meta"), x, y)


def test_empty_training_set(setup) -> None:
    net, lik, x, y = setup
    with pytest.raises(ValueError, match="empty"):
        ntkgp.LinearizedGP(net, lik, x[:0], y[:0])


def test_shape_mismatches(setup) -> None:
    net, lik, x, y = setup
    with pytest.raises(ValueError, match=r"train_y has shape \(11,\)"):
        ntkgp.LinearizedGP(net, lik, x, y[:-1])
    with pytest.raises(ntkgp.NetworkError, match=r"cannot be evaluated on the inputs.*\(3, 2\)"):
        ntkgp.LinearizedGP(net, lik, x[:, :2], y)
    model = ntkgp.LinearizedGP(net, lik, x, y).eval()
    with pytest.raises(ValueError, match=r"examples of shape \(5,\) where the training examples have shape \(3,\)"):
        model(torch.randn(4, 5, dtype=torch.float64))


def test_output_width_must_match_likelihood(setup) -> None:
    _, lik, x, y = setup
    two = truth.mlp(3, 5, 2).eval()
    with pytest.raises(ValueError, match="MultitaskGaussianLikelihood"):
        ntkgp.LinearizedGP(two, lik, x, torch.stack([y, y], -1))
    with pytest.raises(ValueError, match="num_tasks=3"):
        ntkgp.LinearizedGP(
            two, gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=3).double(), x, torch.stack([y, y], -1)
        )
    with pytest.raises(TypeError, match="Gaussian likelihoods"):
        ntkgp.LinearizedGP(truth.mlp(3, 5, 1).eval(), gpytorch.likelihoods.BernoulliLikelihood(), x, y)


@pytest.mark.parametrize(
    "prior,match",
    [
        (0.0, "positive"),
        (-1.0, "positive"),
        (float("nan"), "positive"),
        (torch.ones(3), "4 parameter tensors"),
        ({"0": 1.0}, "does not cover"),
        ({"0": 1.0, "2": 1.0, "9": 1.0}, "no parameters"),
        ("big", "must be a number"),
    ],
)
def test_bad_prior_precision(setup, prior, match) -> None:
    net, lik, x, y = setup
    with pytest.raises((ValueError, TypeError), match=match):
        ntkgp.LinearizedGP(net, lik, x, y, prior_precision=prior)


def test_setting_non_positive_precision(setup) -> None:
    net, lik, x, y = setup
    model = ntkgp.LinearizedGP(net, lik, x, y)
    with pytest.raises(ValueError, match="positive"):
        model.prior_precision = -2.0


def test_dtype_and_solver_name(setup) -> None:
    net, lik, x, y = setup
    with pytest.raises(TypeError, match="dtype"):
        ntkgp.LinearizedGP(net, lik, x.float(), y)
    with pytest.raises(ValueError, match="solver must be"):
        ntkgp.LinearizedGP(net, lik, x, y, solver="cg")


def test_train_mode_call_on_other_inputs(setup) -> None:
    net, lik, x, y = setup
    model = ntkgp.LinearizedGP(net, lik, x, y)
    model.train()
    with pytest.raises(RuntimeError, match="training inputs"):
        model(x[:3])


def test_dense_kernel_too_large_names_the_approximate_routes(setup, monkeypatch) -> None:
    net, lik, x, y = setup
    monkeypatch.setattr("ntkgp.memory.available_memory", lambda device: 1000)
    model = ntkgp.LinearizedGP(net, lik, x, y, solver="kernel")  # the solver is built on first use
    with pytest.raises(KernelTooLargeError, match="Inducing.*SubsetOfData"):
        model.log_evidence()
