"""Structured per-layer Grams (Linear, Conv1d, Conv2d) agree with the generic Jacobian contraction
and with brute-force Jacobians to float64 round-off."""

from __future__ import annotations

import pytest
import torch
import truth
from torch import nn

from ntkgp import FunctionalNetwork, gram
from ntkgp.gram import ntk_gram, ntk_gram_diagonal, structured_gram
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


class Tied(nn.Module):
    """Two Linear modules sharing one weight Parameter: both must fall back to the generic route."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class SharedConv(nn.Module):
    """One Conv2d applied twice, and a grouped conv: both must fall back to the generic route."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.out = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x))))))
        return self.out(torch.tanh(self.grouped(h)).flatten(1))


def _cnn2() -> nn.Module:
    """Two convs (stride 2 + padding 1; dilation 2, no padding), BatchNorm (eval) between, a 3-output head."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 5, 3, dilation=2, stride=(1, 2)), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 1 * 1, 3),
    )
    net(torch.randn(16, 2, 9, 9))  # BatchNorm running statistics, then eval
    return net


def _conv_variants() -> nn.Module:
    """padding="same" with an even kernel (asymmetric), reflect / circular padding, no bias, Conv1d."""
    torch.manual_seed(4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 3, (2, 3), padding="same", padding_mode="reflect")
            self.c2 = nn.Conv2d(3, 2, 3, padding=(1, 2), padding_mode="circular", bias=False)
            self.t1 = nn.Conv1d(2, 3, 4, padding="same", padding_mode="circular")
            self.t2 = nn.Conv1d(3, 2, 3, stride=2, padding=1)
            self.head = nn.Linear(2 * 6 * 7 + 2 * 3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            img = torch.tanh(self.c2(torch.tanh(self.c1(x.reshape(-1, 1, 6, 5)))))  # (n, 2, 6, 7)
            seq = torch.tanh(self.t2(torch.tanh(self.t1(x.reshape(-1, 2, 15)[..., :6]))))  # (n, 2, 3)
            return self.head(torch.cat([img.flatten(1), seq.flatten(1)], 1))

    return Net()


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
        "cnn_two_convs": (_cnn2(), (2, 9, 9)),
        "conv_variants": (_conv_variants(), (30,)),
        "shared_conv": (SharedConv(), (1, 5, 5)),
        "tied_weight": (Tied(), (4,)),
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


def test_which_conv_layers_are_structured() -> None:
    nets = _nets()
    layers = FunctionalNetwork(nets["cnn_two_convs"][0].double().eval(), (2, 9, 9)).structured_layers
    assert [(layer.name, layer.kind) for layer in layers] == [("0", "conv"), ("3", "conv"), ("6", "linear")]
    shared = FunctionalNetwork(nets["shared_conv"][0].double(), (1, 5, 5))
    assert [layer.name for layer in shared.structured_layers] == ["inp", "out"]
    assert {shared.names[i] for i in shared.generic_tensors} == {
        "shared.weight", "shared.bias", "grouped.weight", "grouped.bias"}
    variants = FunctionalNetwork(nets["conv_variants"][0].double(), (30,))
    assert [layer.name for layer in variants.structured_layers] == ["c1", "c2", "t1", "t2", "head"]
    assert variants.generic_tensors == ()
    assert [layer.name for layer in FunctionalNetwork(nets["tied_weight"][0].double(), (4,)).structured_layers] == [
        "head"]
    c2 = [layer for layer in variants.structured_layers if layer.name == "c2"][0]
    assert c2.weight is not None and c2.bias is None


@pytest.mark.parametrize("route", ["gradient", "spatial"])
@pytest.mark.parametrize("name", ["cnn_two_convs", "conv_variants", "cnn_batchnorm", "mlp", "frozen_weight"])
def test_blocked_routes(name: str, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both conv contraction orders, in many small blocks (tiny budget, symmetric Grams from the
    lower block triangle of 3 blocks, factor chunks of 3 points), equal brute force."""
    net, shape = _nets()[name]
    net = net.double().eval()
    monkeypatch.setattr(gram, "_FORCE_CONV_ROUTE", route)
    monkeypatch.setattr(gram, "_MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(gram, "_SYMMETRIC_BLOCKS", 3)
    monkeypatch.setattr(gram, "_CONVERT_ELEMENTS", 5)
    fast = FunctionalNetwork(net, shape, chunk_size=3)
    assert any(layer.kind == "conv" for layer in fast.structured_layers) == name.startswith(("cnn", "conv"))
    groups = parameter_groups(fast.names, torch.linspace(0.5, 2.0, len(fast.names)))
    x1 = torch.randn(7, *shape, dtype=torch.float64).reshape(7, -1)
    x2 = torch.randn(5, *shape, dtype=torch.float64).reshape(5, -1)
    j1, j2 = truth.jacobian(net, x1.reshape(7, *shape)), truth.jacobian(net, x2.reshape(5, *shape))
    prior = torch.cat([torch.full((n,), float(d), dtype=torch.float64)
                       for n, d in zip(fast.numels, groups.initial_precision[list(groups.tensor_group)])])
    weights = groups.initial_precision.reciprocal()
    for a, b, ja, jb in [(x1, None, j1, j1), (x1, x2, j1, j2)]:
        k = torch.einsum("g,gij->ij", weights, ntk_gram(fast, groups, a, b, budget=2**11))
        expected = (ja / prior) @ jb.T
        assert torch.allclose(k, expected, rtol=1e-11, atol=1e-13 * expected.abs().max())
        if b is None:
            assert torch.equal(k, k.T) or torch.allclose(k, k.T, rtol=0, atol=1e-14 * expected.abs().max())
    diagonal = weights @ ntk_gram_diagonal(fast, groups, x1, budget=2**11)
    assert torch.allclose(diagonal, ((j1 / prior) * j1).sum(-1), rtol=1e-12)


def test_structured_gram_weighted_with_convs() -> None:
    """The posterior's call: ``structured_gram`` with ``weights`` sums the per-group blocks."""
    net, shape = _nets()["cnn_two_convs"]
    network = FunctionalNetwork(net.double().eval(), shape)
    groups = parameter_groups(network.names, torch.linspace(0.5, 2.0, len(network.names)))
    x1 = torch.randn(6, *shape, dtype=torch.float64).reshape(6, -1)
    x2 = torch.randn(4, *shape, dtype=torch.float64).reshape(4, -1)
    f1, f2 = network.linear_layer_factors(x1), network.linear_layer_factors(x2)
    C, G = network.num_outputs, groups.num_groups
    weights = torch.linspace(0.3, 3.0, G, dtype=torch.float64)
    for a, b in [(f1, f1), (f1, f2)]:
        per_group = torch.zeros(G, 6 * C, b[0][0].shape[0] * C, dtype=torch.float64)
        structured_gram(network, groups, a, b, per_group)
        direct = torch.zeros(6 * C, b[0][0].shape[0] * C, dtype=torch.float64)
        structured_gram(network, groups, a, b, direct, weights=weights)
        assert torch.allclose(direct, torch.einsum("g,gij->ij", weights, per_group), rtol=1e-13)


@pytest.mark.parametrize("name", sorted(_nets()))
def test_factor_jacobian_equals_autograd(name: str) -> None:
    """Jacobian columns built from structured factors equal vmap(jacrev) ones, also for subsets of tensors."""
    net, shape = _nets()[name]
    net = net.double().eval()
    x = torch.randn(6, *shape, dtype=torch.float64)
    fast, slow = FunctionalNetwork(net, shape), FunctionalNetwork(net, shape, structured=False)
    assert torch.allclose(fast.jacobian(x), slow.jacobian(x), rtol=1e-12, atol=1e-13)
    picked = list(reversed(range(len(fast.names))))[::2]
    assert torch.allclose(fast.jacobian(x, picked), slow.jacobian(x, picked), rtol=1e-12, atol=1e-13)


def test_factor_kernel_matmul_matches_dense_gram_and_cache_follows_inputs() -> None:
    from ntkgp.structured_matvec import factor_kernel_matmul, supports_factor_matmul

    net, shape = _nets()["mlp"]
    net = net.double().eval()
    network = FunctionalNetwork(net, shape)
    groups = parameter_groups(network.names, torch.tensor([0.5, 2.0, 1.0, 3.0, 1.5, 0.7]))
    x1, x2 = torch.randn(30, *shape, dtype=torch.float64), torch.randn(20, *shape, dtype=torch.float64)
    weights = groups.initial_precision.double().reciprocal()
    assert supports_factor_matmul(network, 5)
    columns = torch.randn(5, 20, 2, dtype=torch.float64)

    def dense() -> torch.Tensor:
        gram = torch.einsum("g,gij->ij", weights, ntk_gram(network, groups, x1, x2, budget=2**26))
        return (gram @ columns.reshape(5, -1).T).T.reshape(5, 30, 2)

    assert torch.allclose(factor_kernel_matmul(network, groups, x1, x2, weights, columns, 2**26), dense(), rtol=1e-12)
    x2.mul_(2.0)  # in place: the cached factors of x2 must not be reused
    assert torch.allclose(factor_kernel_matmul(network, groups, x1, x2, weights, columns, 2**26), dense(), rtol=1e-12)
    conv_net, conv_shape = _nets()["cnn_two_convs"]
    assert not supports_factor_matmul(FunctionalNetwork(conv_net.double().eval(), conv_shape), 5)
