"""Reliability: no silent wrong answer, no harm to the user's network, safe under threads.

One test per fault of the hostile sweep (issue 14), each against an independent truth or the
exact error it must raise, and a property-style sweep over random bad inputs.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
import warnings

import gpytorch
import pytest
import torch
import torch.nn.functional as F
import truth
from torch import nn

import ntkgp
from ntkgp.likelihoods import SoftmaxLikelihood
from ntkgp.solvers import Inducing, SubsetOfData

F64 = torch.float64


def _likelihood(noise: float = 0.1) -> gpytorch.likelihoods.GaussianLikelihood:
    lik = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-14)).double()
    lik.noise = torch.tensor(noise, dtype=F64)  # a Python float would pass through float32
    return lik


def _snapshot(net: nn.Module) -> list[tuple[str, int, torch.Tensor, bool]]:
    return [(n, id(p), p.detach().clone(), p.requires_grad) for n, p in net.named_parameters()]


def _untouched(net: nn.Module, before: list[tuple[str, int, torch.Tensor, bool]]) -> bool:
    now = list(net.named_parameters())
    return len(now) == len(before) and all(
        n == n0
        and id(p) == i0
        and torch.equal(p.detach(), v0)
        and p.requires_grad == g0
        and isinstance(p, nn.Parameter)
        for (n, p), (n0, i0, v0, g0) in zip(now, before)
    )


# ------------------------------------------------------------------------------------ 1. threads
@pytest.mark.parametrize("threads", [2, 4])
def test_threads_share_a_model_and_leave_the_network_untouched(threads: int) -> None:
    x, y = truth.toy_regression(40, 3)
    net = truth.mlp(3, 8, 1).eval()
    before = _snapshot(net)
    model = ntkgp.LinearizedGP(net, _likelihood(), x, y).eval()
    x_test = torch.randn(25, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x_test)
        mean, var = reference.mean.clone(), reference.variance.clone()
    failures: list[str] = []

    def predict() -> None:
        try:
            for _ in range(10):
                with torch.no_grad():
                    out = model(x_test)
                    if not (torch.equal(out.mean, mean) and torch.equal(out.variance, var)):
                        failures.append("prediction differs")
        except Exception as err:  # noqa: BLE001 (the test reports every failure)
            failures.append(repr(err))

    workers = [threading.Thread(target=predict) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []
    assert _untouched(net, before) and not net.training


def test_threads_building_gps_from_one_network() -> None:
    x, y = truth.toy_regression(30, 3)
    net = truth.mlp(3, 8, 1).eval()
    before = _snapshot(net)
    expected = float(ntkgp.LinearizedGP(net, _likelihood(), x, y).log_evidence())
    results: list[float] = []
    failures: list[str] = []

    def build() -> None:
        try:
            results.append(float(ntkgp.LinearizedGP(net, _likelihood(), x, y).log_evidence()))
        except Exception as err:  # noqa: BLE001
            failures.append(repr(err))

    workers = [threading.Thread(target=build) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == [] and results == [expected] * 3
    assert _untouched(net, before)


def test_network_flags_modes_and_rng_untouched() -> None:
    torch.manual_seed(5)
    x, y = truth.toy_regression(20, 3)
    net = truth.mlp(3, 6, 1)  # left in train mode by the user
    flags = [m.training for m in net.modules()]
    before = _snapshot(net)
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="train mode"):
        model = ntkgp.LinearizedGP(net, _likelihood(), x, y, solver=Inducing(num_inducing=8))
    model.log_evidence()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x[:4]).variance).all()
    assert torch.equal(state, torch.get_rng_state())
    assert [m.training for m in net.modules()] == flags and _untouched(net, before)


class _FunctionalDropout(nn.Module):
    """Dropout applied functionally, ``F.dropout(h, p, training=self.training)``: no Dropout module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.lin, self.out = nn.Linear(3, 6), nn.Linear(6, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(F.dropout(torch.tanh(self.lin(z)), 0.5, training=self.training))


def test_train_mode_warning_for_functional_dropout() -> None:
    """No Dropout module, dropout in forward: the warning says the GP uses eval mode (no dropout), which can
    differ from the train-mode network, and names functional dropout; it never claims the outputs agree."""
    x, y = truth.toy_regression(20, 3)
    net = _FunctionalDropout().double().train()
    with pytest.warns(UserWarning) as caught:
        model = ntkgp.LinearizedGP(net, _likelihood(), x, y, solver=Inducing(num_inducing=8))
    (message,) = [str(w.message) for w in caught if "train mode" in str(w.message)]
    assert "F.dropout(x, p, training=self.training)" in message and "BatchNorm" in message
    assert "eval mode" in message and "can differ" in message and "net.eval()" in message
    assert "the same" not in message
    assert net.training  # the user's flags are untouched
    with torch.no_grad():  # what the message says: the GP is the eval-mode network
        got = model.network.evaluate(model.train_x[:5], grad=False)
        assert torch.equal(got.reshape(-1), copy.deepcopy(net).eval()(x[:5]).reshape(-1))


@pytest.mark.parametrize(
    ("layer", "words"),
    [
        (nn.Dropout(0.5), ["'1' (Dropout, which in train mode zeroes activations at random)"]),
        (nn.BatchNorm1d(6), ["'1' (BatchNorm1d, which in train mode normalizes with the batch's statistics"]),
    ],
)
def test_train_mode_error_names_dropout_and_batchnorm_modules(layer: nn.Module, words: list[str]) -> None:
    x, y = truth.toy_regression(20, 3)
    net = nn.Sequential(nn.Linear(3, 6), layer, nn.Tanh(), nn.Linear(6, 1)).double().train()
    with pytest.raises(ValueError) as err:
        ntkgp.LinearizedGP(net, _likelihood(), x, y)
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "net.eval()" in message and "no BatchNorm" not in message


# --------------------------------------------------------------------------- 2. weight reuse
class _Reuse(nn.Module):
    """``out(tanh(lin(z)) + F.linear(z, lin.weight))``: a weight used inside and outside its module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin, self.out = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(z)) + F.linear(z, self.lin.weight))


@pytest.mark.parametrize("solver", ["auto", "kernel", "weight"])
def test_weight_used_outside_its_module(solver: str) -> None:
    x, y = truth.toy_regression(30, 3)
    net = _Reuse().double().eval()
    model = ntkgp.LinearizedGP(net, _likelihood(), x, y, solver=solver)
    expected = truth.log_evidence(net, x, y, truth.prior_vector(net, 1.0), torch.full((30,), 0.1, dtype=F64))
    assert abs(float(model.log_evidence()) - float(expected)) <= 1e-9 * abs(float(expected))


# --------------------------------------------------------------------------- 3. non-finite
def test_non_finite_parameters_are_named() -> None:
    x, y = truth.toy_regression(20, 3)
    for name, value in [("2.bias", float("nan")), ("0.weight", float("inf"))]:
        net = truth.mlp(3, 6, 1).eval()
        with torch.no_grad():
            dict(net.named_parameters())[name].view(-1)[0] = value
        with pytest.raises(ntkgp.NonFiniteError, match=rf"parameter '{name}' has 1 NaN or infinite"):
            ntkgp.LinearizedGP(net, _likelihood(), x, y)


class _NanAbove(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.lin(z) / (z[:, :1] <= 1.2).to(z.dtype)  # NaN/inf where z_0 > 1.2


def test_non_finite_outputs_on_training_points_are_named() -> None:
    x, y = truth.toy_regression(30, 3)
    x[:3, 0] = torch.tensor([-1.0, 0.0, 0.5], dtype=F64)  # the probe examples are finite
    bad = (x[:, 0] > 1.2).nonzero().flatten()
    assert bad.numel() > 0
    net = _NanAbove().double().eval()
    model = ntkgp.LinearizedGP(net, _likelihood(), x, y)
    with pytest.raises(ntkgp.NonFiniteError, match=rf"first rows: \[{int(bad[0])}"):
        model.log_evidence()
    labels = (y > 0).long()
    two = nn.Sequential(_NanAbove(), nn.Linear(1, 2)).double().eval()
    with pytest.raises(ntkgp.NonFiniteError, match="NaN or infinite"):
        ntkgp.LinearizedGP(two, SoftmaxLikelihood(2), x, labels)


# ---------------------------------------------------------------------------- 4. random nets
class _AlwaysDropout(nn.Module):
    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, outputs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.lin(z), 0.5, training=True)


def test_random_networks_are_refused_and_the_rng_is_untouched() -> None:
    x, y = truth.toy_regression(20, 3)
    nets = [_AlwaysDropout(1).double(), _AlwaysDropout(2).double()]
    state = torch.get_rng_state()
    with pytest.raises(ntkgp.NetworkError, match="the network is random"):
        ntkgp.LinearizedGP(nets[0], _likelihood(), x, y)
    with pytest.raises(ntkgp.NetworkError, match="the network is random"):
        ntkgp.LinearizedGP(nets[1], SoftmaxLikelihood(2), x, (y > 0).long())
    assert torch.equal(state, torch.get_rng_state())


class _BatchCentred(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.lin(z - z.mean(0))  # statistics over the batch


def test_batch_mixing_networks_are_refused() -> None:
    x, y = truth.toy_regression(20, 3)
    with pytest.raises(ntkgp.NetworkError, match="depends on the other examples in its batch"):
        ntkgp.LinearizedGP(_BatchCentred().double().eval(), _likelihood(), x, y)


# ---------------------------------------------------------------------------- 5. inference mode
@pytest.mark.parametrize("likelihood", ["gaussian", "softmax"])
def test_inference_mode(likelihood: str) -> None:
    x, y = truth.toy_regression(25, 3)
    outputs = 1 if likelihood == "gaussian" else 2
    net = truth.mlp(3, 6, outputs).eval()
    lik, targets = (_likelihood(), y) if outputs == 1 else (SoftmaxLikelihood(2), (y > 0).long())
    x_test = torch.randn(6, 3, dtype=F64)
    plain = ntkgp.LinearizedGP(net, lik, x, targets)
    evidence = float(plain.log_evidence())
    plain.eval()
    with torch.no_grad():
        variance = plain(x_test).variance
    with torch.inference_mode():
        model = ntkgp.LinearizedGP(net, lik, x, targets)
        assert float(model.log_evidence()) == pytest.approx(evidence, rel=1e-12)
        model.eval()
        assert torch.allclose(model(x_test).variance, variance, rtol=1e-12)
    model.train()
    (grad,) = torch.autograd.grad(model.log_evidence(), model.covar_module.raw_prior_precision)
    assert torch.isfinite(grad).all()  # what was built in inference mode serves gradients later


# --------------------------------------------------------------------------- 6. conditioning
def test_ill_conditioning_is_reported() -> None:
    x, y = truth.toy_regression(30, 3)
    net = truth.mlp(3, 8, 1).eval()
    duplicated, targets = torch.cat([x, x[:10]]), torch.cat([y, y[:10]])
    with pytest.warns(ntkgp.IllConditionedWarning, match=r"condition number about .*relative errors up to"):
        ntkgp.LinearizedGP(net, _likelihood(1e-12), duplicated, targets, solver="kernel").log_evidence()
    more, targets = truth.toy_regression(60, 3)  # N > P: J J^T / delta has a null space next to 1e12
    with pytest.warns(ntkgp.IllConditionedWarning):
        ntkgp.LinearizedGP(net, _likelihood(), more, targets, prior_precision=1e-12, solver="kernel").log_evidence()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ntkgp.IllConditionedWarning)
        ntkgp.LinearizedGP(net, _likelihood(), x, y).log_evidence()


# --------------------------------------------------------------------------- 7. half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_networks_run_in_float32(dtype: torch.dtype) -> None:
    x, y = truth.toy_regression(30, 3)
    x_half, x_test = x.to(dtype), torch.randn(8, 3, dtype=F64).to(dtype)
    net = truth.mlp(3, 8, 1).eval().to(dtype)
    with pytest.warns(UserWarning, match="evaluates it in float32"):
        model = ntkgp.LinearizedGP(net, _likelihood().float(), x_half, y.float()).eval()
    reference = ntkgp.LinearizedGP(copy.deepcopy(net).double(), _likelihood(), x_half.double(), y).eval()
    with torch.no_grad():
        got, want = model(x_test), reference(x_test.double())
    assert float((got.mean - want.mean).abs().max() / want.mean.abs().max()) < 1e-5
    assert float((got.variance - want.variance).abs().max() / want.variance.abs().max()) < 1e-5


# ------------------------------------------------------------------------------- 9. pickling
def test_pickle_and_torch_save_round_trip() -> None:
    x, y = truth.toy_regression(20, 3)
    for lik, targets in [(_likelihood(), y), (SoftmaxLikelihood(2), (y > 0).long())]:
        outputs = 1 if targets.dtype.is_floating_point else 2
        model = ntkgp.LinearizedGP(truth.mlp(3, 6, outputs).eval(), lik, x, targets)
        evidence = float(model.log_evidence())
        model.eval()
        with torch.no_grad():
            variance = model(x[:5]).variance
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for copy_ in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
            with torch.no_grad():
                assert torch.equal(copy_(x[:5]).variance, variance)
            copy_.train()
            assert float(copy_.log_evidence()) == evidence


# ------------------------------------------------------------------------- 10. random defaults
def test_defaults_are_reproducible_and_leave_the_rng_alone() -> None:
    x, y = truth.toy_regression(60, 3)
    net, classifier = truth.mlp(3, 6, 1).eval(), truth.mlp(3, 6, 2).eval()  # (truth.mlp seeds the global RNG)
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        sod = ntkgp.LinearizedGP(net, _likelihood(), x, y, solver=SubsetOfData(num_points=15))
        inducing = ntkgp.LinearizedGP(net, _likelihood(), x, y, solver=Inducing(num_inducing=10))
        lik = SoftmaxLikelihood(2, link_approx="mc", n_samples=50)
        mc = ntkgp.LinearizedGP(classifier, lik, x, (y > 0).long()).eval()
        with torch.no_grad():
            probs = lik(mc(x[:4])).probs
        values.append((float(sod.log_evidence()), float(inducing.log_evidence()), probs))
        assert torch.equal(state, torch.get_rng_state())
    assert values[0][:2] == values[1][:2] and torch.equal(values[0][2], values[1][2])


# ---------------------------------------------------------------------------- messages
def test_misleading_messages_are_clear() -> None:
    x, y = truth.toy_regression(20, 3)
    net = truth.mlp(3, 6, 1).eval()
    fixed = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=torch.full((19,), 0.1, dtype=F64))
    with pytest.raises(ValueError, match="19 noise values but there are 20 training points"):
        ntkgp.LinearizedGP(net, fixed, x, y)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(z), z

    with pytest.raises(ntkgp.NetworkError, match="returned a tuple.*output_fn"):
        ntkgp.LinearizedGP(Pair().double(), _likelihood(), x, y)
    model = ntkgp.LinearizedGP(Pair().double(), _likelihood(), x, y, output_fn=lambda out: out[0])
    assert torch.isfinite(model.log_evidence())
    model = ntkgp.LinearizedGP(net, _likelihood(), x, y, prior_precision=[1.0, 2.0, 3.0, 4.0])
    with pytest.raises(TypeError, match="cannot be converted or moved"):
        model.float()
    with pytest.raises(ValueError, match="one number or 4 values"):
        model.prior_precision = torch.ones(3)


# --------------------------------------------------------------------------- property sweep
def _bad_case(rng: torch.Generator) -> tuple[str, dict]:
    """A random mutation of a valid problem: shapes, dtypes, non-finite values, modes."""
    x, y = truth.toy_regression(12, 3)
    kind = int(torch.randint(9, (1,), generator=rng))
    args: dict = {"x": x, "y": y, "net": truth.mlp(3, 5, 1).eval(), "lik": _likelihood(), "prior": 1.0}
    if kind == 0:
        args["x"] = x[:, : int(torch.randint(1, 3, (1,), generator=rng))]
    elif kind == 1:
        args["y"] = y[: int(torch.randint(1, 11, (1,), generator=rng))]
    elif kind == 2:
        args["x"] = x.clone()
        args["x"][int(torch.randint(12, (1,), generator=rng)), 0] = float("nan")
    elif kind == 3:
        args["x"] = x.to([torch.float32, torch.int64, torch.float16][int(torch.randint(3, (1,), generator=rng))])
    elif kind == 4:
        args["prior"] = [-1.0, 0.0, float("inf"), "x", {"nope": 1.0}][int(torch.randint(5, (1,), generator=rng))]
    elif kind == 5:
        args["net"] = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double().train()
    elif kind == 6:
        args["y"] = y.reshape(3, 4)
    elif kind == 7:
        args["x"] = {"a": x, "b": x[:5]}
    else:
        args["lik"] = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=3).double()
    return str(kind), args


def test_random_bad_inputs_give_a_result_or_a_clear_error() -> None:
    rng = torch.Generator().manual_seed(0)
    allowed = (ValueError, TypeError, ntkgp.NetworkError, NotImplementedError)
    for _ in range(40):
        kind, a = _bad_case(rng)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ntkgp.LinearizedGP(a["net"], a["lik"], a["x"], a["y"], prior_precision=a["prior"])
                value = model.log_evidence()
        except allowed as err:
            message = str(err)
            assert len(message) > 20 and "Traceback" not in message, (kind, message)
            continue
        assert torch.isfinite(value), kind  # accepted input must give a finite, correct-shaped answer


@pytest.mark.parametrize("outputs", [1, 2])
def test_gpytorch_loss_uses_the_solver_with_fast_computations_off(outputs: int) -> None:
    """BoTorch turns linear_operator's fast log_prob off at import; the loss must still be the solver's evidence."""
    x, y = truth.toy_regression(40, 3, outputs)
    targets = y.reshape(-1) if outputs == 1 else y
    for solver in (Inducing(num_inducing=10), SubsetOfData(indices=torch.arange(0, 40, 2)), "kernel"):
        lik = (
            gpytorch.likelihoods.GaussianLikelihood()
            if outputs == 1
            else gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=outputs)
        ).double()
        model = ntkgp.LinearizedGP(truth.mlp(3, 6, outputs).eval(), lik, x, targets, solver=solver)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
        model.train(), lik.train()
        with gpytorch.settings.fast_computations(log_prob=False):
            loss = -mll(model(x), targets) * targets.numel()  # GPyTorch divides by N*C
        assert torch.allclose(-loss, model.log_evidence(), rtol=1e-10), solver
