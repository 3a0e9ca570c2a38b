"""Any network a user has: token ids, several inputs, dicts, model outputs, subnetworks, loaders.

Every form is compared with a float64 brute force over the whole network (``truth.jacobian_of``,
torch.autograd.functional, independent of ntkgp), and the structured routes must cover the
transformer, the ResNet and the tabular model.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
import torch.nn.functional as F
import truth
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ntkgp
from ntkgp.likelihoods import SoftmaxLikelihood

F64 = torch.float64
G = torch.Generator().manual_seed(7)


def _likelihood(noise: float = 0.1, tasks: int = 1) -> gpytorch.likelihoods.Likelihood:
    if tasks == 1:
        lik = gpytorch.likelihoods.GaussianLikelihood().double()
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=tasks, has_global_noise=False).double()
        lik.task_noises = torch.full((tasks,), noise, dtype=F64)
        return lik
    lik.noise = torch.tensor(noise, dtype=F64)
    return lik


def _structured_fraction(model: ntkgp.LinearizedGP) -> float:
    plan, numels = model.ntk.plan(), model.network.numels
    return sum(numels[i] for i in plan.structured) / sum(numels)


# ------------------------------------------------------------------------------ networks
class Transformer(nn.Module):
    """Embedding + TransformerEncoderLayer (padding mask) + LayerNorm + mean pool + Linear, on token ids."""

    def __init__(self, vocab: int = 13, width: int = 8, classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.encoder = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids == 0
        h = self.norm(self.encoder(self.embed(ids), src_key_padding_mask=mask))
        keep = (~mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class Tabular(nn.Module):
    """Numeric and categorical (embedded) inputs, ``forward(x_num, x_cat)``, with a GroupNorm."""

    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(5, 3)
        self.body = nn.Linear(4 + 3, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.out = nn.Linear(8, outputs)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_num, self.embed(x_cat)], 1)
        return self.out(torch.tanh(self.norm(self.body(h))))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """A CIFAR-style ResNet in miniature: stem conv + BN, two residual blocks, pooling, linear head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(Block(4), Block(4))
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def _eval_with_statistics(net: nn.Module, x: torch.Tensor) -> nn.Module:
    net.train()
    with torch.no_grad():
        net(x)  # BatchNorm running statistics
    return net.eval()


def _softmax_truth(net: nn.Module, call, call_test, y: torch.Tensor, delta: float):
    with torch.no_grad():
        f = call(net).to(F64)
    hessians = truth.nll_hessians(lambda v, n: -torch.log_softmax(v, -1)[y[n]], f)
    j, jt = truth.jacobian_of(net, call), truth.jacobian_of(net, call_test)
    theta, prior = truth.flat_params(net), truth.prior_vector(net, delta)
    log_lik = -F.cross_entropy(f, y, reduction="sum")
    return truth.ggn_laplace_from(j, jt, hessians, prior, theta, log_lik)


# ----------------------------------------------------------------------------------- tests
def test_transformer_on_token_ids_equals_brute_force() -> None:
    net = Transformer().double().eval()
    ids = torch.randint(1, 13, (24, 6), generator=G)
    ids[::3, 4:] = 0  # padding
    test_ids = torch.randint(1, 13, (5, 6), generator=G)
    y = torch.randint(0, 2, (24,), generator=G)
    model = ntkgp.LinearizedGP(net, SoftmaxLikelihood(2), ids, y, prior_precision=2.0, mode="map")
    assert _structured_fraction(model) == 1.0
    evidence, covariance = _softmax_truth(net, lambda f: f(ids), lambda f: f(test_ids), y, 2.0)
    assert float(model.log_evidence()) == pytest.approx(float(evidence), rel=1e-9)
    model.eval()
    with torch.no_grad():
        latent = model(test_ids)
    assert torch.allclose(latent.covariance_matrix, covariance, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_several_inputs_equal_brute_force(form: str) -> None:
    net = Tabular(outputs=2).double().eval()
    x_num, x_cat = torch.randn(30, 4, generator=G, dtype=F64), torch.randint(0, 5, (30,), generator=G)
    t_num, t_cat = torch.randn(6, 4, generator=G, dtype=F64), torch.randint(0, 5, (6,), generator=G)
    y = torch.randn(30, 2, generator=G, dtype=F64)
    train = (x_num, x_cat) if form == "tuple" else {"x_num": x_num, "x_cat": x_cat}
    test = (t_num, t_cat) if form == "tuple" else {"x_num": t_num, "x_cat": t_cat}
    model = ntkgp.LinearizedGP(net, _likelihood(0.1, tasks=2), train, y, prior_precision=1.5)
    assert _structured_fraction(model) == 1.0
    j, jt = truth.jacobian_of(net, lambda f: f(x_num, x_cat)), truth.jacobian_of(net, lambda f: f(t_num, t_cat))
    with torch.no_grad():
        fx = net(x_num, x_cat)
    evidence, covariance = truth.gaussian_gp(
        j, fx, truth.flat_params(net), y, truth.prior_vector(net, 1.5), torch.full((60,), 0.1, dtype=F64), jt
    )
    assert float(model.log_evidence()) == pytest.approx(float(evidence), rel=1e-10)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(test).covariance_matrix, covariance, rtol=1e-9, atol=1e-12)


def test_output_fn_on_a_model_output_object() -> None:
    class WithLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = truth.mlp(3, 6, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.inner(x), "hidden": x}

    x, _ = truth.toy_regression(20, 3)
    y = (x[:, 0] > 0).long()
    net = WithLogits().double().eval()
    with pytest.raises(ntkgp.NetworkError, match="returned a dict.*output_fn"):
        ntkgp.LinearizedGP(net, SoftmaxLikelihood(2), x, y)
    model = ntkgp.LinearizedGP(net, SoftmaxLikelihood(2), x, y, output_fn=lambda out: out["logits"])
    plain = ntkgp.LinearizedGP(net.inner, SoftmaxLikelihood(2), x, y)
    assert float(model.log_evidence()) == pytest.approx(float(plain.log_evidence()), rel=1e-12)


@pytest.mark.parametrize(
    "subnetwork,names",
    [
        ("last_layer", ["fc.weight", "fc.bias"]),
        (["blocks.1", "fc"], None),
        (lambda name, p: name.startswith("fc") or ".bn" in name, None),
    ],
)
def test_subnetworks_equal_brute_force(subnetwork, names: list[str] | None) -> None:
    x = torch.randn(12, 3, 6, 6, generator=G, dtype=F64)
    net = _eval_with_statistics(TinyResNet().double(), torch.randn(16, 3, 6, 6, generator=G, dtype=F64))
    flags = [p.requires_grad for p in net.parameters()]
    y = torch.randint(0, 3, (12,), generator=G)
    model = ntkgp.LinearizedGP(net, SoftmaxLikelihood(3), x, y, prior_precision=3.0, subnetwork=subnetwork, mode="map")
    chosen = list(model.network.names)
    if names is not None:
        assert chosen == names
    elif isinstance(subnetwork, list):
        assert chosen and all(n.startswith(("blocks.1.", "fc.")) for n in chosen)
    assert [p.requires_grad for p in net.parameters()] == flags  # the user's flags are never touched
    with torch.no_grad():
        f = net(x)
    hessians = truth.nll_hessians(lambda v, n: -torch.log_softmax(v, -1)[y[n]], f)
    j = truth.jacobian_of(net, lambda fn: fn(x), chosen)
    theta = torch.cat([dict(net.named_parameters())[n].detach().reshape(-1) for n in chosen])
    prior = torch.full_like(theta, 3.0)
    evidence, _ = truth.ggn_laplace_from(j, j, hessians, prior, theta, -F.cross_entropy(f, y, reduction="sum"))
    assert float(model.log_evidence()) == pytest.approx(float(evidence), rel=1e-9)


def test_last_layer_gp_equals_laplace_torch() -> None:
    laplace = pytest.importorskip("laplace")
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).double().eval()
    x = torch.randn(60, 5, generator=G, dtype=F64)
    y = torch.randint(0, 4, (60,), generator=G)
    x_test = torch.randn(7, 5, generator=G, dtype=F64)
    model = ntkgp.LinearizedGP(
        net, SoftmaxLikelihood(4), x, y, prior_precision=2.0, subnetwork="last_layer", mode="map"
    )
    assert ntkgp.ntk.uses_kronecker_outer(model.ntk) and model.solver.name == "weight"
    peer = laplace.Laplace(
        net, "classification", subset_of_weights="last_layer", hessian_structure="full", prior_precision=2.0
    )
    peer.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    assert float(model.log_evidence()) == pytest.approx(float(peer.log_marginal_likelihood()), rel=1e-9)
    model.eval()
    _, peer_var = peer._glm_predictive_distribution(x_test)
    with torch.no_grad():
        blocks = model(x_test).lazy_covariance_matrix.point_blocks()
    assert torch.allclose(
        blocks, peer_var, rtol=1e-7, atol=1e-10
    )  # the target; the peer inverts a P x P matrix


def test_tiny_resnet_is_structured_and_exact() -> None:
    x = torch.randn(10, 3, 6, 6, generator=G, dtype=F64)
    net = _eval_with_statistics(TinyResNet().double(), torch.randn(16, 3, 6, 6, generator=G, dtype=F64))
    y = torch.randint(0, 3, (10,), generator=G)
    model = ntkgp.LinearizedGP(net, SoftmaxLikelihood(3), x, y, prior_precision=1.0, solver="kernel", mode="map")
    assert _structured_fraction(model) == 1.0
    evidence, _ = _softmax_truth(net, lambda f: f(x), lambda f: f(x[:2]), y, 1.0)
    assert float(model.log_evidence()) == pytest.approx(float(evidence), rel=1e-9)


def test_from_loader_equals_the_direct_build() -> None:
    net = Tabular().double().eval()
    x_num, x_cat = torch.randn(40, 4, generator=G, dtype=F64), torch.randint(0, 5, (40,), generator=G)
    y = torch.randn(40, generator=G, dtype=F64)
    loader = DataLoader(
        TensorDataset(x_num, x_cat, y),
        batch_size=12,
        collate_fn=lambda b: (
            (torch.stack([r[0] for r in b]), torch.stack([r[1] for r in b])),
            torch.stack([r[2] for r in b]),
        ),
    )
    from_loader = ntkgp.LinearizedGP.from_loader(net, _likelihood(), loader, prior_precision=2.0)
    direct = ntkgp.LinearizedGP(net, _likelihood(), (x_num, x_cat), y, prior_precision=2.0)
    assert float(from_loader.log_evidence()) == pytest.approx(float(direct.log_evidence()), rel=1e-12)
    with pytest.raises(TypeError, match="batches of \\(x, y\\)"):
        ntkgp.LinearizedGP.from_loader(net, _likelihood(), [x_num], prior_precision=2.0)


def test_input_form_errors_are_clear() -> None:
    net = Tabular().double().eval()
    x_num, x_cat = torch.randn(20, 4, generator=G, dtype=F64), torch.randint(0, 5, (20,), generator=G)
    y = torch.randn(20, generator=G, dtype=F64)
    with pytest.raises(ValueError, match="different numbers of examples"):
        ntkgp.LinearizedGP(net, _likelihood(), (x_num, x_cat[:19]), y)
    model = ntkgp.LinearizedGP(net, _likelihood(), {"x_num": x_num, "x_cat": x_cat}, y).eval()
    with pytest.raises(ValueError, match=r"missing keys \['x_cat'\]"):
        model({"x_num": x_num[:3]})
    with pytest.raises(ValueError, match="form 'args'"):
        model((x_num[:3], x_cat[:3]))
    with pytest.raises(ValueError, match=r"shape \(5,\) where the training examples have shape \(4,\)"):
        model({"x_num": torch.randn(3, 5, dtype=F64), "x_cat": x_cat[:3]})


class Recurrent(nn.Module):
    """An LSTM or GRU regressor: its kernels have no vmap rule, so ntkgp takes one backward per row."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.rnn = cell(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("solver", ["kernel", "weight"])
def test_recurrent_networks_equal_brute_force(cell: type[nn.Module], solver: str) -> None:
    net = Recurrent(cell).double().eval()
    x = torch.randn(12, 4, 3, generator=G, dtype=F64)
    x_test = torch.randn(3, 4, 3, generator=G, dtype=F64)
    y = torch.randn(12, 2, generator=G, dtype=F64)
    with pytest.warns(UserWarning, match="cannot vmap"):
        model = ntkgp.LinearizedGP(net, _likelihood(0.1, 2), x, y, prior_precision=2.0, solver=solver)
        evidence = model.log_evidence()
    prior, noise = truth.prior_vector(net, 2.0), torch.full((24,), 0.1, dtype=F64)
    assert float(evidence) == pytest.approx(float(truth.log_evidence(net, x, y, prior, noise)), rel=1e-10)
    model.eval()
    with torch.no_grad():
        cov = model(x_test).covariance_matrix
    j, j_test = truth.jacobian(net, x), truth.jacobian(net, x_test)
    assert torch.allclose(cov, truth.posterior_covariance(j, j_test, prior, noise), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["resnet", "transformer", "tabular"])
@pytest.mark.parametrize("budget", [None, 2**12])
def test_prior_point_blocks_equal_brute_force(name: str, budget: int | None) -> None:
    """Per-point ``C x C`` prior blocks (the probit predictive's input) on conv, BatchNorm, embedding,
    attention and GroupNorm units, with per-module prior precisions, from per-example weight
    gradients in chunks (a tiny budget: one example per chunk) equal the brute-force ``J P0^-1 J^T``."""
    from ntkgp.ntk import point_blocks

    if name == "resnet":
        net = _eval_with_statistics(TinyResNet().double(), torch.randn(16, 3, 6, 6, generator=G, dtype=F64))
        x: object = torch.randn(7, 3, 6, 6, generator=G, dtype=F64)
        call = lambda f: f(x)  # noqa: E731
    elif name == "transformer":
        net = Transformer().double().eval()
        x = torch.randint(1, 13, (7, 6), generator=G)
        call = lambda f: f(x)  # noqa: E731
    else:
        net = Tabular(outputs=2).double().eval()
        x = (torch.randn(7, 4, generator=G, dtype=F64), torch.randint(0, 5, (7,), generator=G))
        call = lambda f: f(*x)  # noqa: E731
    with torch.no_grad():
        C = call(net).shape[-1]
    y = torch.zeros(7, C, dtype=F64) if C > 1 else torch.zeros(7, dtype=F64)
    model = ntkgp.LinearizedGP(net, _likelihood(tasks=C), x, y, prior_precision="module", memory_budget=budget)
    assert _structured_fraction(model) == 1.0
    ntk = model.ntk
    delta = torch.linspace(0.5, 3.0, ntk.layout.num_groups, dtype=F64)
    got = point_blocks(ntk, model.network.inputs(x), delta.reciprocal())
    j = truth.jacobian_of(net, call)  # shape: (n C, P)
    ranges = ntk.layout.column_ranges(tuple(range(len(ntk.network.names))))
    variance = torch.cat([delta[g].reciprocal().expand(stop - start) for g, start, stop in ranges])
    full = ((j * variance) @ j.T).reshape(7, C, 7, C)
    want = full.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())


@pytest.mark.parametrize("task", ["softmax", "gaussian"])
def test_last_layer_runs_the_network_once_over_each_input(monkeypatch: pytest.MonkeyPatch, task: str) -> None:
    """A last-layer GP of a ResNet takes f(x) (and J(x) theta) and the head's captures from one pass over the
    training inputs (build and evidence) and one over the test inputs (mean and covariance), and stays exact."""
    classes = 3 if task == "softmax" else 1
    x = torch.randn(12, 3, 6, 6, generator=G, dtype=F64)
    x_test = torch.randn(5, 3, 6, 6, generator=G, dtype=F64)
    net = _eval_with_statistics(TinyResNet(classes).double(), torch.randn(16, 3, 6, 6, generator=G, dtype=F64))
    y = torch.randint(0, 3, (12,), generator=G) if task == "softmax" else torch.randn(12, generator=G, dtype=F64)
    passes: list[int] = []  # examples per network call, probes (at most 3 examples) left out
    call = ntkgp.network.FunctionalNetwork.call

    def counting(self: object, params: object, xs: ntkgp.network.Inputs, **kwargs: object) -> torch.Tensor:
        if xs.num > 3:
            passes.append(xs.num)
        return call(self, params, xs, **kwargs)

    monkeypatch.setattr(ntkgp.network.FunctionalNetwork, "call", counting)
    lik = SoftmaxLikelihood(3) if task == "softmax" else _likelihood(0.3)
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=2.0, subnetwork="last_layer", mode="map")
    evidence = float(model.log_evidence())
    assert passes == [12]
    model.eval(), lik.eval()
    with torch.no_grad():
        out = model(x_test)
        mean, blocks = out.mean.reshape(5, classes), out.lazy_covariance_matrix.point_blocks()
    assert passes == [12, 5]
    head = {"fc.weight", "fc.bias"}
    for name, p in net.named_parameters():
        p.requires_grad_(name in head)  # the truth's Jacobian over the head only
    if task == "softmax":
        want_evidence, want_cov = _softmax_truth(net, lambda f: f(x), lambda f: f(x_test), y, 2.0)
        want_mean = net(x_test).detach()
    else:
        j, jt = truth.jacobian_of(net, lambda f: f(x)), truth.jacobian_of(net, lambda f: f(x_test))
        theta, prior = truth.flat_params(net), truth.prior_vector(net, 2.0)
        noise = torch.full((12,), 0.3, dtype=F64)
        want_evidence, want_cov = truth.gaussian_gp(j, net(x).detach(), theta, y, prior, noise, jt)
        precision = j.T @ (j / 0.3) + torch.diag(prior)
        prior_mean = net(x).detach().reshape(-1) - j @ theta
        weights = torch.linalg.solve(precision, j.T @ ((y - prior_mean) / 0.3))
        want_mean = (net(x_test).detach().reshape(-1) - jt @ theta + jt @ weights).reshape(5, 1)
    assert evidence == pytest.approx(float(want_evidence), rel=1e-10)
    assert torch.allclose(mean, want_mean, rtol=1e-9, atol=1e-12)
    want_blocks = torch.stack([want_cov.reshape(5, classes, 5, classes)[n, :, n, :] for n in range(5)])
    assert torch.allclose(blocks, want_blocks, rtol=1e-9, atol=1e-12)
