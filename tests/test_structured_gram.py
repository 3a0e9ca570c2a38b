"""Structured routes (linear maps, convolutions, reused weights, normalization affines) agree with the
generic Jacobian contraction and with brute-force Jacobians to float64 round-off, on every route."""

from __future__ import annotations

import pytest
import torch
import truth
from builders import make_ntk
from torch import nn

import ntkgp.structured.workspace as workspace
from ntkgp.ntk import captures, gram, gram_diagonal, jacobian, kernel_matmul, structured_gram, uses_factor_form
from ntkgp.ntk.products import outputs_and_pushforward
from ntkgp.ntk.reference import ReferenceOperands, chunk_products


class Residual(nn.Module):
    """A custom module: y = x + tanh(W x) * s, with a learnable scale s (generic route)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x)) * self.scale


class Shared(nn.Module):
    """One Linear applied twice (weight sharing): its positions are concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


class Sequence3d(nn.Module):
    """A Linear on (n, T, d) inputs (summed over positions): a dense map at T positions."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(2, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.tok(x.reshape(x.shape[0], 2, 2))).sum(1))


class Tied(nn.Module):
    """Two Linear modules sharing one weight Parameter: one tensor used at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class SharedConv(nn.Module):
    """One Conv2d applied twice (two sites) and a grouped conv (generic route)."""

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
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 5, 3, dilation=2, stride=(1, 2)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * 1 * 1, 3),
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
    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )
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


def _inputs(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _brute_force(net: nn.Module, x1: torch.Tensor, x2: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """J(x1) P0^-1 J(x2)^T by torch.autograd.functional, independent of ntkgp."""
    return (truth.jacobian(net, x1) / prior) @ truth.jacobian(net, x2).T


@pytest.mark.parametrize("name", list(_nets()))
@pytest.mark.parametrize("prior", ["scalar", "per_tensor"])
def test_structured_equals_generic(name: str, prior: str) -> None:
    net, shape = _nets()[name]
    net = net.double().eval()
    x1, x2 = _inputs(shape, 7, 0), _inputs(shape, 5, 1)
    fast, a = make_ntk(net, x1, budget=2**20)
    spec = 1.0 if prior == "scalar" else torch.linspace(0.5, 2.0, len(fast.network.names))
    fast, a = make_ntk(net, x1, spec, budget=2**20)
    slow, _ = make_ntk(net, x1, spec, budget=2**20, implementation="generic")
    b = fast.network.inputs(x2)
    for right in (None, b):
        k_fast, k_slow = gram(fast, a, right), gram(slow, a, right)
        assert torch.allclose(k_fast, k_slow, rtol=1e-12, atol=1e-13 * k_slow.abs().max())
    d_fast = gram_diagonal(fast, a)
    assert torch.allclose(d_fast, gram(slow, a).diagonal(dim1=-2, dim2=-1), rtol=1e-12)
    layout = fast.layout
    per_parameter = layout.expand(layout.initial_precision)
    weights = layout.initial_precision.reciprocal()
    expected = _brute_force(net, x1, x2, per_parameter)
    k_cross = layout.weighted(weights, gram(fast, a, b))
    assert torch.allclose(k_cross, expected, rtol=1e-11, atol=1e-13 * expected.abs().max())


def _structured(name: str) -> tuple[set[str], set[str]]:
    """(structured, generic) tensor names of a test net."""
    net, shape = _nets()[name]
    ntk, x = make_ntk(net.double().eval(), _inputs(shape, 4, 2))
    plan = ntk.plan()
    names = ntk.network.names
    return {names[i] for i in plan.structured}, {names[i] for i in plan.generic}


def test_which_tensors_are_structured() -> None:
    structured, generic = _structured("shared_linear")
    assert generic == set() and "shared.weight" in structured  # one module applied twice: two sites
    assert _structured("sequence_linear")[1] == set()  # a Linear on (n, T, d): T positions
    structured, generic = _structured("frozen_weight")
    assert "2.weight" not in structured | generic and "2.bias" in structured  # frozen: not in θ
    structured, generic = _structured("custom_module")
    assert generic == {"1.scale"}  # the custom scale; the LayerNorm's affine is structured
    assert {"2.weight", "2.bias", "1.lin.weight"} <= structured
    assert _structured("cnn_two_convs")[1] == set()
    assert _structured("shared_conv")[1] == {"grouped.weight", "grouped.bias"}
    assert _structured("conv_variants")[1] == set()
    assert _structured("tied_weight")[1] == set()


def test_units_of_a_plan() -> None:
    net, shape = _nets()["cnn_two_convs"]
    ntk, _ = make_ntk(net.double().eval(), _inputs(shape, 4, 2))
    kinds = [(unit.kind, unit.positions, unit.weight is not None, unit.bias is not None) for unit in ntk.plan().units]
    # conv (25 output pixels), BatchNorm affine (25 positions), conv (one output pixel), linear
    assert kinds == [
        ("dense", 25, True, True),
        ("affine", 25, True, True),
        ("dense", 1, True, True),
        ("dense", 1, True, True),
    ]
    net, shape = _nets()["conv_variants"]
    ntk, _ = make_ntk(net.double().eval(), _inputs(shape, 4, 2))
    second = ntk.plan().units[1]
    assert second.weight is not None and second.bias is None  # c2 has no bias


@pytest.mark.parametrize("route", ["gradient", "spatial"])
@pytest.mark.parametrize(
    "name",
    ["cnn_two_convs", "conv_variants", "cnn_batchnorm", "mlp", "frozen_weight", "sequence_linear", "shared_conv"],
)
def test_blocked_routes(name: str, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both contraction orders for units at many positions, in many small blocks (tiny budget, symmetric
    Grams from the lower block triangle of 3 blocks, captures of 3 points), equal brute force."""
    net, shape = _nets()[name]
    net = net.double().eval()
    monkeypatch.setattr(workspace, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(workspace, "SYMMETRIC_BLOCKS", 3)
    monkeypatch.setattr(workspace, "_CONVERT_ELEMENTS", 5)
    x1, x2 = _inputs(shape, 7, 3), _inputs(shape, 5, 4)
    spec = torch.linspace(0.5, 2.0, sum(p.requires_grad for p in net.parameters()))
    ntk, a = make_ntk(net, x1, spec, budget=2**11, chunk_size=3, conv_route=route)
    assert any(u.positions > 1 for u in ntk.plan().units) == (name not in ("mlp", "frozen_weight"))
    layout = ntk.layout
    prior, weights = layout.expand(layout.initial_precision), layout.initial_precision.reciprocal()
    b = ntk.network.inputs(x2)
    for right, xr in [(None, x1), (b, x2)]:
        k = layout.weighted(weights, gram(ntk, a, right))
        expected = _brute_force(net, x1, xr, prior)
        assert torch.allclose(k, expected, rtol=1e-11, atol=1e-13 * expected.abs().max())
        if right is None:
            assert torch.allclose(k, k.T, rtol=0, atol=1e-14 * expected.abs().max())
    diagonal = weights @ gram_diagonal(ntk, a)
    j1 = truth.jacobian(net, x1)
    assert torch.allclose(diagonal, ((j1 / prior) * j1).sum(-1), rtol=1e-12)


def test_structured_gram_weighted_with_convs() -> None:
    """The posterior's call: ``structured_gram`` with ``weights`` sums the per-group blocks."""
    net, shape = _nets()["cnn_two_convs"]
    net = net.double().eval()
    ntk, x1 = make_ntk(net, _inputs(shape, 6, 5), torch.linspace(0.5, 2.0, 8))
    x2 = ntk.network.inputs(_inputs(shape, 4, 6))
    f1, f2 = captures(ntk, x1), captures(ntk, x2)
    C, G = ntk.num_outputs, ntk.layout.num_groups
    weights = torch.linspace(0.3, 3.0, G, dtype=torch.float64)
    for a, b, n2 in [(f1, f1, 6), (f1, f2, 4)]:
        per_group = torch.zeros(G, 6 * C, n2 * C, dtype=torch.float64)
        structured_gram(ntk, a, b, per_group)
        direct = torch.zeros(6 * C, n2 * C, dtype=torch.float64)
        structured_gram(ntk, a, b, direct, weights=weights)
        assert torch.allclose(direct, ntk.layout.weighted(weights, per_group), rtol=1e-13)


@pytest.mark.parametrize("name", sorted(_nets()))
def test_structured_jacobian_equals_autograd(name: str) -> None:
    """Jacobian columns built from captures equal vmap(jacrev) ones, also for subsets of tensors."""
    net, shape = _nets()[name]
    net = net.double().eval()
    x = _inputs(shape, 6, 7)
    fast, inputs = make_ntk(net, x)
    slow, _ = make_ntk(net, x, implementation="generic")
    assert torch.allclose(jacobian(fast, inputs), jacobian(slow, inputs), rtol=1e-12, atol=1e-13)
    picked = list(reversed(range(len(fast.network.names))))[::2]
    assert torch.allclose(jacobian(fast, inputs, picked), jacobian(slow, inputs, picked), rtol=1e-12, atol=1e-13)
    assert torch.allclose(
        jacobian(fast, inputs).reshape(-1, fast.network.num_parameters), truth.jacobian(net, x), rtol=1e-12, atol=1e-13
    )


def test_factor_kernel_matmul_matches_dense_gram_and_cache_follows_inputs() -> None:
    net, shape = _nets()["mlp"]
    net = net.double().eval()
    x1, x2 = _inputs(shape, 30, 8), _inputs(shape, 20, 9)
    ntk, a = make_ntk(net, x1, torch.tensor([0.5, 2.0, 1.0, 3.0, 1.5, 0.7]))
    b = ntk.network.inputs(x2)
    weights = ntk.layout.initial_precision.reciprocal()
    assert uses_factor_form(ntk, 5)
    columns = torch.randn(5, 20, 2, dtype=torch.float64)

    def dense() -> torch.Tensor:
        k = ntk.layout.weighted(weights, gram(ntk, a, b))
        return (k @ columns.reshape(5, -1).T).T.reshape(5, 30, 2)

    assert torch.allclose(kernel_matmul(ntk, a, b, weights, columns), dense(), rtol=1e-12)
    x2.mul_(2.0)  # in place: the cached captures of x2 must not be reused
    assert torch.allclose(kernel_matmul(ntk, a, b, weights, columns), dense(), rtol=1e-12)
    conv_net, conv_shape = _nets()["cnn_two_convs"]
    conv_ntk, _ = make_ntk(conv_net.double().eval(), _inputs(conv_shape, 4, 10))
    assert not uses_factor_form(conv_ntk, 5)


@pytest.mark.parametrize("name", list(_nets()))
@pytest.mark.parametrize(("route", "held"), [("auto", True), ("gradient", True), ("spatial", True), ("auto", False)])
def test_reference_products_equal_generic(name: str, route: str, held: bool) -> None:
    """One capture pass of a chunk gives its cross-Gram against held reference inputs and its per-point
    blocks, per group (weights and biases in groups of their own), as the generic route does."""
    net, shape = _nets()[name]
    net = net.double().eval()
    x, z = _inputs(shape, 7, 0), _inputs(shape, 4, 1)
    fast, a = make_ntk(net, x, budget=2**20, conv_route=route)
    spec = torch.linspace(0.5, 2.0, len(fast.network.names))
    fast, a = make_ntk(net, x, spec, budget=2**20, conv_route=route)
    slow, _ = make_ntk(net, x, spec, budget=2**20, implementation="generic")
    b = fast.network.inputs(z)
    if held:
        products = ReferenceOperands(fast, b, rows=a.num).products(a, blocks=True)
    else:
        products = chunk_products(fast, a, b, blocks=True)
    want_cross = gram(slow, a, b)
    assert torch.allclose(products.cross, want_cross, rtol=1e-12, atol=1e-13 * want_cross.abs().max())
    C = fast.num_outputs
    whole = gram(slow, a).reshape(-1, a.num, C, a.num, C)
    want_blocks = torch.stack([whole[:, n, :, n, :] for n in range(a.num)], 1)  # shape: (G, n, C, C)
    assert products.blocks is not None
    assert torch.allclose(products.blocks, want_blocks, rtol=1e-12, atol=1e-13 * want_blocks.abs().max())


@pytest.mark.parametrize("name", list(_nets()))
def test_outputs_and_pushforward_from_captures_equal_a_jvp(name: str) -> None:
    """f(x) and J(x)v from one capture pass (the closed form of every unit kind: dense at many positions,
    convolutions, affine, embeddings) equal a forward pass and a jvp; a later product reuses the captures."""
    net, shape = _nets()[name]
    net = net.double().eval()
    x = _inputs(shape, 6, 0)
    fast, a = make_ntk(net, x, budget=2**22)
    tangents = torch.randn(
        3, fast.network.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    f, pushed = outputs_and_pushforward(fast, a, tangents)
    assert torch.allclose(f, fast.network.forward(a), rtol=1e-13, atol=1e-14)
    want = fast.network.jvp(a, tangents)
    assert torch.allclose(pushed, want, rtol=1e-11, atol=1e-13 * want.abs().max())
    if name in ("mlp", "shared_linear", "sequence_linear", "tied_weight", "frozen_weight"):
        assert fast.captures.get(a) is not None  # the closed form ran, and kept the captures
    fast.captures.put(a, captures(fast, a))  # held captures: the closed form for every unit kind
    again = outputs_and_pushforward(fast, a, tangents)[1]
    assert torch.allclose(again, want, rtol=1e-11, atol=1e-13 * want.abs().max())
