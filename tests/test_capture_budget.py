"""Structured captures beyond the memory budget: tiled Grams, recomputed reference captures, test
blocks sized by their captures.

A convolution at many positions holds its patches and ``C`` output cotangents per example: a few MB
per example for a CIFAR ResNet, more than its Jacobian. When the captures of the training inputs do
not fit in half of ``memory_budget``, the Gram is built in tiles and the cross-kernel of predictions
recaptures the training inputs per test block; test blocks are sized so that their captures fit.
Every quantity must equal a float64 brute force, and the peak memory of many predictions must stay
bounded (a subprocess probe of peak RSS).
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
    tiled = gram_module._tiled_structured_gram

    def counting(*args: object, **kwargs: object) -> None:
        calls.append(1)
        tiled(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gram_module, "_tiled_structured_gram", counting)
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
    with torch.no_grad():
        latent = model(x[n:])
        cov = latent.covariance_matrix
    post = model.posterior()
    kernel = post[1].kernel if isinstance(post, tuple) else post.kernel
    assert kernel.reference_captures is None  # recaptured per test block, not held

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
    grows by less than 64 MiB (sized without their captures, the test blocks took 330 MB)."""
    peak = int(probe(PEAK_SCRIPT, threads=1))
    assert peak < 64 * 2**20, f"predictions grew the peak by {peak / 2**20:.0f} MiB"
