"""Structured per-layer Grams agree with the generic Jacobian contraction to float64 round-off."""

from __future__ import annotations

import pytest
import torch
import truth
from torch import nn

from ntkgp import FunctionalNetwork
from ntkgp.gram import ntk_gram, ntk_gram_diagonal
from ntkgp.parameter_groups import parameter_groups


class Residual(nn.Module):
    """A custom module: y = x + tanh(W x) * s, with a learnable scale s (generic route)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x)) * self.scale


class Shared(nn.Module):
    """One Linear applied twice (weight sharing): must fall back to the generic route."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


class Sequence3d(nn.Module):
    """A Linear on (n, T, d) inputs (summed over positions): generic route."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(2, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.tok(x.reshape(x.shape[0], 2, 2))).sum(1))


def _nets() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8),
                        nn.Tanh(), nn.Linear(8, 3))
    cnn(torch.randn(16, 1, 6, 6))  # BatchNorm running statistics, then eval
    frozen = truth.mlp(4, 6, 2, depth=2, seed=1)
    frozen[2].weight.requires_grad_(False)
    return {
        "mlp": (truth.mlp(4, 7, 2, depth=2, seed=2), (4,)),
        "cnn_batchnorm": (cnn, (1, 6, 6)),
        "custom_module": (nn.Sequential(nn.Linear(4, 5), Residual(5), nn.LayerNorm(5), nn.Linear(5, 2)), (4,)),
        "shared_linear": (Shared(), (4,)),
        "sequence_linear": (Sequence3d(), (4,)),
        "frozen_weight": (frozen, (4,)),
    }


@pytest.mark.parametrize("name", list(_nets()))
@pytest.mark.parametrize("prior", ["scalar", "per_tensor"])
def test_structured_equals_generic(name: str, prior: str) -> None:
    net, shape = _nets()[name]
    net = net.double().eval()
    x1 = torch.randn(7, *shape, dtype=torch.float64).reshape(7, -1)
    x2 = torch.randn(5, *shape, dtype=torch.float64).reshape(5, -1)
    fast = FunctionalNetwork(net, shape)
    slow = FunctionalNetwork(net, shape, structured=False)
    spec = 1.0 if prior == "scalar" else torch.linspace(0.5, 2.0, len(fast.names))
    groups = parameter_groups(fast.names, spec)
    for a, b in [(x1, None), (x1, x2)]:
        k_fast = ntk_gram(fast, groups, a, b, budget=2**20)
        k_slow = ntk_gram(slow, groups, a, b, budget=2**20)
        assert torch.allclose(k_fast, k_slow, rtol=1e-12, atol=1e-13 * k_slow.abs().max())
    d_fast = ntk_gram_diagonal(fast, groups, x1, budget=2**20)
    assert torch.allclose(d_fast, ntk_gram(slow, groups, x1, budget=2**20).diagonal(dim1=-2, dim2=-1), rtol=1e-12)
    # brute force, independent of ntkgp
    j1, j2 = truth.jacobian(net, x1.reshape(7, *shape)), truth.jacobian(net, x2.reshape(5, *shape))
    prior = torch.cat([torch.full((n,), float(d), dtype=torch.float64)
                       for n, d in zip(fast.numels, groups.initial_precision[list(groups.tensor_group)])])
    weights = groups.initial_precision.reciprocal()
    k_cross = torch.einsum("g,gij->ij", weights, ntk_gram(fast, groups, x1, x2, budget=2**20))
    expected = (j1 / prior) @ j2.T
    assert torch.allclose(k_cross, expected, rtol=1e-11, atol=1e-13 * expected.abs().max())


def test_which_layers_are_structured() -> None:
    nets = _nets()
    assert [layer.name for layer in FunctionalNetwork(nets["shared_linear"][0].double(), (4,)).linear_layers] == [
        "inp", "out"]
    assert [layer.name for layer in FunctionalNetwork(nets["sequence_linear"][0].double(), (4,)).linear_layers] == [
        "head"]
    frozen = FunctionalNetwork(nets["frozen_weight"][0].double(), (4,))
    layer = [layer for layer in frozen.linear_layers if layer.name == "2"][0]
    assert layer.weight is None and layer.bias is not None
    custom = FunctionalNetwork(nets["custom_module"][0].double(), (4,))
    generic = {custom.names[i] for i in custom.generic_tensors}
    assert generic == {"1.scale", "2.weight", "2.bias"}  # the custom scale and LayerNorm's affine
