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
from ntkgp.structured.capture import capture_with_outputs
from ntkgp.structured.chain import DenseChain

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


def test_predictions_take_the_closed_form_route_and_keep_their_gradients() -> None:
    """The batched posterior of a plain MLP uses the chain; its input gradients equal the capture pass's."""
    torch.manual_seed(4)
    gp = _gp(NETS["tanh"](1).double(), 1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    calls = {"chain": 0}
    chain = gp.ntk.dense_chain
    assert chain is not None
    original = DenseChain.capture

    def counted(self: DenseChain, params: dict[str, Tensor], data: Tensor):  # type: ignore[no-untyped-def]
        calls["chain"] += 1
        return original(self, params, data)

    def value(route_chain: bool) -> Tensor:
        gp.ntk.__dict__["dense_chain"] = chain if route_chain else None
        out = gp(x)
        return out.mean.sum() + out.covariance_matrix.square().sum()

    try:
        DenseChain.capture = counted  # type: ignore[method-assign]
        fast = value(True)
        assert calls["chain"] == 1
        (fast_grad,) = torch.autograd.grad(fast, x)
        slow = value(False)
        (slow_grad,) = torch.autograd.grad(slow, x)
        assert calls["chain"] == 1
    finally:
        DenseChain.capture = original  # type: ignore[method-assign]
        gp.ntk.__dict__["dense_chain"] = chain
    assert torch.allclose(fast, slow, rtol=TOL, atol=0)
    assert float((fast_grad - slow_grad).abs().max()) <= TOL * float(slow_grad.abs().max())


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
    assert gp.ntk.dense_chain is None
