"""Structured captures beyond the memory budget: tiled Grams, recomputed reference captures, test
blocks sized by their captures.

A convolution at many positions holds its patches and ``C`` output cotangents per example: a few MB
per example for a CIFAR ResNet, more than its Jacobian. Grams from inputs are built in tiles of held
weight gradients, each tile captured once and the rest streamed past it (the capture passes are
counted). When the captures of the training inputs do not fit in half of ``memory_budget``, the
cross-kernel of predictions recaptures the training inputs per test block; test blocks are sized so
that what they hold fits. Every quantity must equal a float64 brute force (float32 Grams: within the
documented bound), and the peak memory of many predictions must stay bounded (a subprocess probe of
peak RSS).
"""

from __future__ import annotations

import importlib
import textwrap

import gpytorch
import pytest
import torch
import truth
from rss_probe import needs_clear_refs, probe
from torch import nn

import ntkgp
from ntkgp.likelihoods import SoftmaxLikelihood
from ntkgp.ntk.captures import capture_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
gram_module = importlib.import_module("ntkgp.ntk.gram")  # the module, which ntkgp.ntk.gram (the function) shadows
captures_module = importlib.import_module("ntkgp.ntk.captures")
tiles_module = importlib.import_module("ntkgp.ntk.tiles")
prior_kernel_module = importlib.import_module("ntkgp.posteriors.prior_kernel")


def _conv_net(classes: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, classes),
    ).double()
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 2, 8, 8, dtype=torch.float64))
    return net.eval()


def _data(n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _count_tiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    tiled = gram_module.tiled_gram

    def counting(*args: object, **kwargs: object) -> None:
        calls.append(1)
        tiled(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gram_module, "tiled_gram", counting)
    return calls


def test_softmax_laplace_beyond_the_budget_equals_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evidence, latent covariance and probabilities of a kernel-space Laplace GP whose training
    captures are 6x half the budget: equal to the float64 weight-space GGN Laplace."""
    classes, n, n_test = 3, 40, 13
    net = _conv_net(classes)
    x, y = _data(n + n_test, classes)
    budget = 2**19
    calls = _count_tiles(monkeypatch)
    model = ntkgp.LinearizedGP(
        net, SoftmaxLikelihood(classes), x[:n], y[:n], mode="map", solver="kernel", memory_budget=budget
    )
    xi = model.network.inputs(x[:n])
    assert capture_bytes(model.ntk, xi) > 3 * budget  # so the tiles and the recapture are exercised
    evidence = model.log_evidence().detach()
    assert calls, "the Gram did not take the tiled route"
    model.eval()
    streamed: list[int] = []
    streamed_parts = prior_kernel_module.PriorKernel._streamed_parts

    def counting(self: object, x: ntkgp.network.Inputs, *args: object) -> None:
        streamed.append(x.num)
        streamed_parts(self, x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(prior_kernel_module.PriorKernel, "_streamed_parts", counting)
    with torch.no_grad():
        blocks = model(x[n:]).lazy_covariance_matrix.point_blocks()  # per block, never the dense matrix
        latent = model(x[n:])
        cov = latent.covariance_matrix
    post = model.posterior()
    kernel = post[1].kernel if isinstance(post, tuple) else post.kernel
    assert kernel.reference_captures is None  # recaptured per test block, not held
    assert sum(streamed) == n_test  # the per-point blocks streamed the test blocks' captures

    j, j_test = truth.jacobian(net, x[:n]), truth.jacobian(net, x[n:])
    theta = truth.flat_params(net)
    prior = torch.ones_like(theta)
    with torch.no_grad():
        f = net(x[:n])
    probs = f.softmax(-1)
    hessians = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    log_lik = -nn.functional.cross_entropy(f, y[:n], reduction="sum")
    want_evidence, want_cov = truth.ggn_laplace_from(j, j_test, hessians, prior, theta, log_lik)
    assert abs(float(evidence - want_evidence)) <= 1e-8 * abs(float(want_evidence))
    assert float((cov - want_cov).abs().max()) <= 1e-8 * float(want_cov.abs().max())
    want_blocks = torch.stack(
        [want_cov[i * classes : (i + 1) * classes, i * classes : (i + 1) * classes] for i in range(n_test)]
    )
    assert float((blocks - want_blocks).abs().max()) <= 1e-8 * float(want_cov.abs().max())


def test_gram_tiles_equal_the_whole_gram(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-group Grams (symmetric and between two input sets) in tiles equal the brute-force ones."""
    net = _conv_net(2)
    x, _ = _data(30, 2)
    calls = _count_tiles(monkeypatch)
    model = ntkgp.LinearizedGP(
        net,
        gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2).double(),
        x[:20],
        torch.zeros(20, 2, dtype=torch.float64),
        prior_precision="module",
        memory_budget=2**19,
    )
    ntk = model.ntk
    x1, x2 = ntk.network.inputs(x[:20]), ntk.network.inputs(x[20:])
    weights = torch.arange(1.0, ntk.layout.num_groups + 1, dtype=torch.float64)
    symmetric = gram_module.gram(ntk, x1, weights=weights)
    cross = gram_module.gram(ntk, x1, x2, weights=weights)
    per_group = gram_module.gram(ntk, x1, x2)
    assert len(calls) == 3
    j1, j2 = truth.jacobian(net, x[:20]), truth.jacobian(net, x[20:])
    ranges = ntk.layout.column_ranges(tuple(range(len(ntk.network.names))))
    scale = torch.cat([weights[g].expand(stop - start) for g, start, stop in ranges])
    for got, want in [(symmetric, (j1 * scale) @ j1.T), (cross, (j1 * scale) @ j2.T)]:
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())
    assert torch.allclose(per_group.sum(0), j1 @ j2.T, rtol=0, atol=1e-10 * float((j1 @ j2.T).abs().max()))


def _count_captured(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Examples per capture pass, every pass counted (the generic route takes none)."""
    counts: list[int] = []
    capture = captures_module.capture_with_outputs

    def counting(network: object, plan: object, x: ntkgp.network.Inputs) -> object:
        counts.append(x.num)
        return capture(network, plan, x)  # type: ignore[arg-type]

    monkeypatch.setattr(captures_module, "capture_with_outputs", counting)
    return counts


def _gram_model(net: nn.Module, x: torch.Tensor, budget: int, classes: int) -> ntkgp.LinearizedGP:
    dtype = next(net.parameters()).dtype
    return ntkgp.LinearizedGP(
        net,
        gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=classes).to(dtype),
        x,
        torch.zeros(x.shape[0], classes, dtype=dtype),
        prior_precision="module",
        memory_budget=budget,
    )


def test_tiled_gram_captures_each_tile_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A symmetric Gram in 4 tiles captures each tile once and streams only the examples after it past
    it: N + (N - R) + (N - 2R) + ... example captures (the old tiles recaptured every column tile for
    every row tile: N (N + 1) / 2 here), and equals the brute-force Gram to round-off."""
    net, n = _conv_net(2), 30
    x, _ = _data(n, 2)
    ntk = _gram_model(net, x, 98304, 2).ntk
    xi = ntk.network.inputs(x)
    layout = tiles_module.operand_layout(ntk, n, n, True)
    tile, _ = tiles_module.tile_rows(ntk, layout)
    assert tile == 8  # 4 tiles of 8, 8, 8 and 6 examples
    counts = _count_captured(monkeypatch)
    weights = torch.arange(1.0, ntk.layout.num_groups + 1, dtype=torch.float64)
    got = gram_module.gram(ntk, xi, weights=weights)
    assert sum(counts) == n + (n - 8) + (n - 16) + (n - 24)
    j = truth.jacobian(net, x)
    ranges = ntk.layout.column_ranges(tuple(range(len(ntk.network.names))))
    scale = torch.cat([weights[g].expand(stop - start) for g, start, stop in ranges])
    want = (j * scale) @ j.T
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
    assert torch.equal(got, got.T)


def test_symmetric_grams_are_exactly_symmetric_per_group_and_from_held_captures() -> None:
    """Every route of ``gram(ntk, x)`` returns an exactly symmetric Gram: per group (tiled) and weighted
    from held captures. A GEMM's diagonal block is symmetric only up to its BLAS kernel (on an AMD EPYC
    with MKL it was not), so ``gram`` mirrors the lower triangle."""
    net, n = _conv_net(2), 30
    x, _ = _data(n, 2)
    ntk = _gram_model(net, x, 98304, 2).ntk
    xi = ntk.network.inputs(x)
    per_group = gram_module.gram(ntk, xi)
    weights = torch.arange(1.0, ntk.layout.num_groups + 1, dtype=torch.float64)
    held = gram_module.gram(ntk, xi, weights=weights, captures1=captures_module.captures(ntk, xi))
    assert per_group.shape == (ntk.layout.num_groups, 2 * n, 2 * n)
    assert torch.equal(per_group, per_group.mT) and torch.equal(held, held.mT)
    assert float((held - torch.einsum("g,gij->ij", weights, per_group)).abs().max()) <= 1e-12 * float(held.abs().max())


@pytest.mark.parametrize("n1", [7, 25])
def test_tiled_cross_gram_holds_the_cheaper_side(monkeypatch: pytest.MonkeyPatch, n1: int) -> None:
    """A cross-Gram holds tiles of the side that costs fewer captures and streams the other past each
    tile: with tiles of 8, (7, 25) holds the 7 (7 + 25 captures), (25, 7) holds the 7 too (transposed)."""
    net = _conv_net(2)
    x, _ = _data(32, 2)
    ntk = _gram_model(net, x[:8], 98304, 2).ntk
    x1, x2 = x[:n1], x[n1:]
    counts = _count_captured(monkeypatch)
    got = gram_module.gram(ntk, ntk.network.inputs(x1), ntk.network.inputs(x2))
    assert sum(counts) == 32
    want = truth.jacobian(net, x1) @ truth.jacobian(net, x2).T
    assert float((got.sum(0) - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_float32_gram_within_the_documented_bound() -> None:
    """A float32 network's weight gradients (held by the tiles, or formed from captures by the gradient
    route) are contracted in float32 panels of FLOAT32_PANEL columns and summed in float64: every entry
    is within FLOAT32_PANEL * 2**-24 * sqrt(k_aa k_bb) of the float64 product of the same gradients (the
    documented worst case), and the Gram equals the float64 network's to float32 accuracy. A float64
    network's Gram is float64 throughout (1e-12)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),  # 4,608 weights: two panels
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 3),
    )
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 3, 8, 8))
    net.eval()
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ntk = _gram_model(net, x, 2**30, 3).ntk
    xi = ntk.network.inputs(x)
    layout = tiles_module.operand_layout(ntk, 12, 12, True)
    conv = ntk.layout.tensor_group[ntk.network.names.index("3.weight")]
    assert layout.widths[conv] > tiles_module.FLOAT32_PANEL
    ops = tiles_module.operands(ntk, xi, layout)
    got = gram_module.gram(ntk, xi)
    from_captures = gram_module.gram(ntk, xi, captures1=ntkgp.ntk.captures(ntk, xi))  # the gradient route's blocks
    assert got.dtype == torch.float64
    bound = tiles_module.FLOAT32_PANEL * 2.0**-24
    for g, width in enumerate(layout.widths):
        if not width:
            continue
        gradients = ops.gradients[g].double()
        exact = gradients @ gradients.T
        scale = exact.diagonal().sqrt()
        for gram in (got, from_captures):
            assert bool(((gram[g] - exact).abs() <= bound * scale[:, None] * scale[None, :]).all())
    net64 = net.double()
    ntk64 = _gram_model(net64, x.double(), 2**30, 3).ntk
    want = gram_module.gram(ntk64, ntk64.network.inputs(x.double()))
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    j = truth.jacobian(net64, x.double())
    assert float((want.sum(0) - j @ j.T).abs().max()) <= 1e-12 * float((j @ j.T).abs().max())


PEAK_SCRIPT = textwrap.dedent(
    """
    import re, sys, warnings, torch, ntkgp
    from torch import nn
    from ntkgp.likelihoods import SoftmaxLikelihood
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 16 * 16, 4)).double().eval()
    x = torch.randn(660, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (60,))
    model = ntkgp.LinearizedGP(net, SoftmaxLikelihood(4), x[:60], y, mode="map", solver="kernel",
                               memory_budget=2**24, chunk_size=50)
    model.log_evidence()
    model.eval()
    def rss(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    open("/proc/self/clear_refs", "w").write("5")
    base = rss("VmRSS")
    with torch.no_grad():
        model.likelihood(model(x[60:])).probs
    print(rss("VmHWM") - base)
    """
)


@needs_clear_refs
def test_predictions_stay_within_the_budget() -> None:
    """600 predictions of a conv net whose captures take 0.55 MB per example (330 MB for the test
    points, 33 MB for the training points) with a 16 MiB budget and chunks of 50 examples: the peak
    grows by less than 64 MiB (sized without their captures, the test blocks took 330 MB). Live memory:
    blocks of 1 MiB and more are mmapped, so freed chunks are not counted as glibc's heap retention
    (which added up to 70 MiB in some identical runs; :func:`rss_probe.probe`)."""
    peak = int(probe(PEAK_SCRIPT, threads=1, mmap_threshold=2**20))
    assert peak < 64 * 2**20, f"predictions grew the peak by {peak / 2**20:.0f} MiB"
