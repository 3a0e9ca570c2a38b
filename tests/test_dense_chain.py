"""Closed-form captures of plain MLPs (:mod:`ntkgp.structured.chain`) against the autograd capture pass.

For test inputs that require grad, a plain ``nn.Sequential`` MLP takes the closed-form route. Its
layer inputs, output cotangents and outputs must equal the capture pass's (one forward, ``C``
backward passes with ``create_graph``), and so must the gradients of a random functional of them
in the inputs (float64, 1e-12 relative). Networks that are not plain MLPs keep the capture pass.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from torch import Tensor, nn

import ntkgp
from ntkgp.posteriors.dense_groups import DenseGroups
from ntkgp.structured.capture import capture_with_outputs

TOL = 1e-12


def _gp(net: nn.Module, c: int) -> ntkgp.LinearizedGP:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, c, generator=g, dtype=torch.float64)
    if c == 1:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
        y = y[:, 0]
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=c, rank=0).double()
    return ntkgp.LinearizedGP(net.eval(), lik, x, y, solver="kernel").eval()


def _functional(captures: list, out: Tensor, seed: int) -> Tensor:
    """A random linear functional of every capture and the outputs."""
    g = torch.Generator().manual_seed(seed)
    total = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    for cap in captures:
        for t in (cap.inputs, cap.cotangents):
            total = total + (t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()
    return total


NETS = {
    "tanh": lambda c: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, c)),
    "relu_sigmoid": lambda c: nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, c)),
    "stacked_no_bias": lambda c: nn.Sequential(nn.Linear(3, 6, bias=False), nn.Tanh(), nn.Sigmoid(), nn.Linear(6, c)),
    "linear": lambda c: nn.Sequential(nn.Linear(3, c)),
}


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("c", [1, 2])
def test_closed_form_captures_equal_the_capture_pass(name: str, c: int) -> None:
    torch.manual_seed(1)
    gp = _gp(NETS[name](c).double(), c)
    ntk = gp.ntk
    ntk.plan()
    chain = ntk.dense_chain
    assert chain is not None
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = gp.network.inputs(x)
    want_caps, want_out = capture_with_outputs(gp.network, ntk.plan(), inputs)
    got_caps, got_out = chain.capture(gp.network.params, x)
    assert len(got_caps) == len(want_caps)
    assert torch.allclose(got_out, want_out, rtol=TOL, atol=0)
    for got, want in zip(got_caps, want_caps):
        assert got.cotangents.shape == want.cotangents.shape
        assert torch.allclose(got.cotangents, want.cotangents, rtol=TOL, atol=TOL)
        assert got.inputs is not None and want.inputs is not None
        assert torch.allclose(got.inputs, want.inputs, rtol=TOL, atol=0)
    (want_grad,) = torch.autograd.grad(_functional(want_caps, want_out, 3), x)
    (got_grad,) = torch.autograd.grad(_functional(got_caps, got_out, 3), x)
    assert float((got_grad - want_grad).abs().max()) <= TOL * float(want_grad.abs().max())


class _Same(nn.Sequential):
    """The same function as its ``nn.Sequential``: not a plain MLP to :class:`DenseChain` (the capture pass)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)


@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_predictions_through_the_chain_equal_the_capture_pass(solver: str) -> None:
    """Batched posteriors (and their input gradients), plain predictions and the evidence of a plain MLP
    (closed-form captures, training side too) equal those of the same network through the capture pass."""
    torch.manual_seed(4)
    plain = NETS["tanh"](1).double()
    same = _Same(*plain)
    g = torch.Generator().manual_seed(0)
    x_train = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y_train = torch.randn(12, generator=g, dtype=torch.float64)
    values, grads = [], []
    for net in (plain, same):
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
        lik.noise = 0.1
        gp = ntkgp.LinearizedGP(net.eval(), lik, x_train, y_train, solver=solver)
        gp.ntk.plan()
        assert (gp.ntk.dense_chain is not None) == (net is plain)
        evidence = gp.log_evidence().detach()
        gp.eval()
        x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
        out = gp(x)
        value = out.mean.sum() + out.covariance_matrix.square().sum()
        (grad,) = torch.autograd.grad(value, x)
        with torch.no_grad():
            flat = gp(x.detach().reshape(-1, 3))
        values.append(torch.cat([value.detach()[None], evidence[None], flat.mean, flat.covariance_matrix.reshape(-1)]))
        grads.append(grad)
    assert torch.allclose(values[0], values[1], rtol=TOL, atol=TOL)
    assert float((grads[0] - grads[1]).abs().max()) <= TOL * float(grads[1].abs().max())


class _Subclass(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(2 * x)


@pytest.mark.parametrize(
    "net",
    [
        _Subclass(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(3, 1), nn.Tanh()),
        nn.Sequential(nn.Tanh(), nn.Linear(3, 1)),
    ],
    ids=["subclass", "gelu", "layernorm", "ends_in_activation", "starts_with_activation"],
)
def test_other_networks_keep_the_capture_pass(net: nn.Module) -> None:
    gp = _gp(net.double(), 1)
    gp.ntk.plan()
    assert gp.ntk.dense_chain is None


# ------------------------------------------------------------------ the batched route of plain MLPs
def _batched(gp: ntkgp.LinearizedGP, x: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, joint covariances and the input gradient of a random functional of both, for ``x`` ``(b, q, d)``."""
    x = x.detach().clone().requires_grad_(True)
    out = gp(x)
    g = torch.Generator().manual_seed(seed)
    mean, cov = out.mean, out.covariance_matrix
    value = (mean * torch.randn(mean.shape, generator=g, dtype=mean.dtype)).sum()
    value = value + (cov * torch.randn(cov.shape, generator=g, dtype=cov.dtype)).sum()
    (grad,) = torch.autograd.grad(value, x)
    return mean.detach(), cov.detach(), grad


def _generic(monkeypatch: pytest.MonkeyPatch, gp: ntkgp.LinearizedGP, x: Tensor, seed: int) -> tuple[Tensor, ...]:
    """:func:`_batched` through the generic route (structured Gram kernels on the closed-form captures)."""
    with monkeypatch.context() as patch:
        patch.setattr(DenseGroups, "of", classmethod(lambda cls, posterior: None))
        return _batched(gp, x, seed)


def _assert_close(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> None:
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert float((g - w).abs().max()) <= TOL * max(1.0, float(w.abs().max()))


def _per_tensor_gp(net: nn.Module, kind: str, c: int) -> ntkgp.LinearizedGP:
    """A GP with one prior precision per tensor (weights and biases apart), ``kind`` of posterior."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    if kind == "laplace":
        lik: gpytorch.likelihoods.Likelihood = ntkgp.likelihoods.SoftmaxLikelihood(num_classes=c)
        y = torch.randint(0, c, (12,), generator=g)
    elif c == 1:
        lik, y = gpytorch.likelihoods.GaussianLikelihood().double(), torch.randn(12, generator=g, dtype=torch.float64)
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=c, rank=0).double()
        y = torch.randn(12, c, generator=g, dtype=torch.float64)
    solver: object = "kernel"
    if kind == "inducing":
        solver = ntkgp.solvers.Inducing(num_inducing=6, selection=torch.arange(0, 12, 2))
    elif kind == "lanczos":
        solver = ntkgp.solvers.Lanczos(rank=5)
    gp = ntkgp.LinearizedGP(net, lik, x, y, prior_precision="tensor", solver=solver)  # type: ignore[arg-type]
    gp.prior_precision = torch.linspace(0.5, 2.0, len(gp.prior_precision), dtype=torch.float64)
    if kind != "laplace":
        gp.likelihood.noise = 0.1
    return gp.eval()


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("kind", ["kernel", "inducing", "lanczos", "laplace"])
def test_batched_route_of_plain_mlps_equals_the_generic_route(
    monkeypatch: pytest.MonkeyPatch, name: str, c: int, kind: str
) -> None:
    """:class:`~ntkgp.posteriors.dense_groups.DenseGroups` (few operations, the posterior's side prepared
    once) against the generic batched route on the same captures: means, joint covariances and input
    gradients within 1e-12, for every posterior with a prior-minus-downdate covariance (Laplace: 2 and 3
    classes)."""
    c = c + 1 if kind == "laplace" else c
    torch.manual_seed(1)
    gp = _per_tensor_gp(NETS[name](c).double().eval(), kind, c)
    x = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = _batched(gp, x, 7)
    assert isinstance(gp.posterior().dense_groups, DenseGroups)  # the fast route was taken
    _assert_close(got, _generic(monkeypatch, gp, x, 7))


def test_dense_groups_are_kept_and_renewed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prepared state is reused while the posterior stands (a cached and an uncached call agree to
    1e-12) and renewed with the hyperparameters, the noise, the training data (``add_data``) and an
    in-place change of the posterior; a GP of a changed network gets its own."""
    torch.manual_seed(2)
    net = NETS["tanh"](1).double().eval()
    gp = _per_tensor_gp(net, "kernel", 1)
    x = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    first = _batched(gp, x, 1)
    post = gp.posterior()
    held = post.dense_groups
    assert isinstance(held, DenseGroups)
    again = _batched(gp, x, 1)
    assert gp.posterior().dense_groups is held  # kept
    fresh = DenseGroups(post, held.chain)  # an uncached state, prepared now
    with monkeypatch.context() as patch:
        patch.setattr(DenseGroups, "of", classmethod(lambda cls, posterior: fresh))
        uncached = _batched(gp, x, 1)
    _assert_close(again, first)
    _assert_close(uncached, first)

    def renewed(before: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        got = _batched(gp, x, 1)
        assert gp.posterior().dense_groups is not held
        assert float((got[1] - before[1]).abs().max()) > 1e-6  # the change shows
        _assert_close(got, _generic(monkeypatch, gp, x, 1))
        return got

    gp.prior_precision = torch.linspace(3.0, 0.2, len(gp.prior_precision), dtype=torch.float64)
    values = renewed(first)
    held = gp.posterior().dense_groups
    gp.likelihood.noise = 0.02
    values = renewed(values)
    held = gp.posterior().dense_groups
    g = torch.Generator().manual_seed(8)
    gp.add_data(torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
    values = renewed(values)
    gp.posterior().weights.mul_(1.5)  # in place: the prepared shift is stale
    got = _batched(gp, x, 1)
    assert float((got[0] - values[0]).abs().max()) > 1e-6
    _assert_close(got, _generic(monkeypatch, gp, x, 1))

    with torch.no_grad():  # the GP holds a snapshot of the network: unchanged; a new GP sees the change
        net[0].weight.add_(0.3)
    _assert_close(_batched(gp, x, 1), got)
    other = _per_tensor_gp(net, "kernel", 1)
    changed = _batched(other, x, 1)
    assert float((changed[1] - first[1]).abs().max()) > 1e-6
    _assert_close(changed, _generic(monkeypatch, other, x, 1))


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("c", [1, 2])
def test_pullback_through_the_captures_equals_the_vjp(name: str, c: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pullback`` of a plain MLP (few cotangents) goes through the closed-form captures, not a vjp: equal to the
    network's vjp, and so are the gradients in inputs that require grad."""
    from ntkgp.network.functional import FunctionalNetwork
    from ntkgp.ntk import pullback

    vjp = FunctionalNetwork.vjp

    def pull(ntk, x, cot):  # type: ignore[no-untyped-def]
        with monkeypatch.context() as patch:
            patch.setattr(FunctionalNetwork, "vjp", None)  # not called
            return pullback(ntk, x, cot)

    torch.manual_seed(2)
    gp = _gp(NETS[name](c).double(), c)
    ntk, x = gp.ntk, gp.train_x
    ntk.plan()
    assert ntk.dense_chain is not None
    g = torch.Generator().manual_seed(3)
    cot = torch.randn(2, x.num, c, generator=g, dtype=torch.float64)
    got, want = pull(ntk, x, cot), vjp(ntk.network, x, cot)
    assert float((got - want).abs().max()) <= TOL * float(want.abs().max())
    data = x.data.clone().requires_grad_(True)
    weights = torch.randn(2, got.shape[1], generator=g, dtype=torch.float64)
    grads = []
    for route in (lambda xi: pull(ntk, xi, cot), lambda xi: vjp(ntk.network, xi, cot)):
        (route(gp.inputs(data)) * weights).sum().backward()
        grads.append(data.grad.clone())
        data.grad = None
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-10 * float(grads[1].abs().max())
