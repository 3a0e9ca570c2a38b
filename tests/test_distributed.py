"""The GP sharded over 2 and 3 gloo processes (uneven shards) against one process on the same data.

Each world size is started once (``torch.multiprocessing.spawn``, one thread per process) and runs
every scenario; each rank saves what it computed. The tests compare each rank's evidence, its
gradients with respect to the prior precisions and the noise, and its predictive mean and variance
(at its own share of the test points) with one process on the concatenated shards, to 1e-10
relative in float64, and check that replicated quantities are bitwise equal on every rank.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import gpytorch
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import ntkgp
from ntkgp.likelihoods import SoftmaxLikelihood
from ntkgp.marglik import MarglikTuner, SubsetEvidenceBound
from ntkgp.solvers import ConjugateGradients, Inducing, SubsetOfData
from ntkgp.solvers.inducing import kmeans_points, select_inducing_points
from ntkgp.solvers.inducing.sharded_kmeans import sharded_kmeans_points

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

#: points per rank (uneven), training and test
SHARDS = {2: [15, 22], 3: [9, 12, 16]}
TEST_SHARDS = {2: [4, 7], 3: [2, 4, 5]}
N, N_TEST = 37, 11
#: relative tolerance of every sharded quantity against one process
RTOL = 1e-10
#: points per subset of the subset bound
SUBSET = 5


# ----------------------------------------------------------------------------- data and networks
def _data(outputs: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N + N_TEST, 3, generator=g, dtype=torch.float64) * 2 - 1
    f = torch.stack([torch.sin(2 * x[:, 0]) + x[:, 1] ** 2, x[:, 2] * x[:, 0]], 1)[:, :outputs]
    y = f + 0.1 * torch.randn(f.shape, generator=g, dtype=torch.float64)
    return x[:N], (y[:N, 0] if outputs == 1 else y[:N]), x[N:]


def _labels() -> Tensor:
    x = _data(1)[0]
    return (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.3).long()


def _net(outputs: int) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, outputs)).double()


def _gaussian(outputs: int) -> gpytorch.likelihoods.Likelihood:
    if outputs == 1:
        lik = gpytorch.likelihoods.GaussianLikelihood()
        lik.noise = 0.3
    else:
        lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=outputs, rank=0, has_global_noise=False)
        lik.task_noises = torch.tensor([0.3, 0.2])
    return lik.double()


def _grads(model: ntkgp.LinearizedGP) -> dict[str, Tensor]:
    out = {"grad_delta": model.covar_module.raw_prior_precision.grad.clone()}
    for name, p in model.likelihood.named_parameters():
        out[f"grad_{name}"] = p.grad.clone()
    return out


def _gp(x: Tensor, y: Tensor, group: Any, outputs: int, solver: Any, **kwargs: Any) -> ntkgp.LinearizedGP:
    lik = kwargs.pop("likelihood", None) or _gaussian(outputs)
    return ntkgp.LinearizedGP(_net(outputs).eval(), lik, x, y, solver=solver, process_group=group, **kwargs)


def _evidence_and_predictive(model: ntkgp.LinearizedGP, xt: Tensor) -> dict[str, Tensor]:
    evidence = model.log_evidence()
    evidence.backward()
    post = model.posterior()
    var = post.covariance_diagonal(xt).reshape(xt.shape[0], -1)
    return {"evidence": evidence.detach(), **_grads(model), "mean": post.mean(xt), "var": var}


# ----------------------------------------------------------------------------- scenarios
# Each takes (the rank's slice of the training points, its slice of the test points, the group, the
# row offsets of every rank) and returns named tensors; "mean" and "var" are per test point.
def _weight(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    x, y, xt = _data(1)
    model = _gp(x[sl], y[sl], group, 1, "weight", prior_precision="tensor")
    return _evidence_and_predictive(model, xt[tsl])


def _laplace(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    x, _, xt = _data(1)
    lik = SoftmaxLikelihood(num_classes=3)
    model = _gp(x[sl], _labels()[sl], group, 3, "weight", likelihood=lik, prior_precision=2.0, mode="linearized")
    return _evidence_and_predictive(model, xt[tsl])


def _inducing(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    x, y, xt = _data(1)
    model = _gp(x[sl], y[sl], group, 1, Inducing(num_inducing=9), prior_precision="tensor")
    out = _evidence_and_predictive(model, xt[tsl])
    out["kmeans"] = model.solver.indices.cpu()
    out["pivoted"] = select_inducing_points("pivoted_cholesky", model.problem, 6, pool_size=20)
    out["random"] = select_inducing_points("random", model.problem, 6)
    return out


def _kmeans_pool(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    """k-means with its seeding pool (N = 12,000 > 10,000 points: seeds drawn from a random 10,000)."""
    world = 1 if group is None else dist.get_world_size(group)
    features = torch.randn(12_000, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    if group is None:
        return {"indices": kmeans_points(features, 7, torch.Generator().manual_seed(0))}
    mine = ntkgp.distributed.shard_range(12_000, dist.get_rank(group), world)
    sharding = ntkgp.distributed.Sharding.create(group, len(mine))
    chosen = sharded_kmeans_points(features[mine.start : mine.stop], 7, torch.Generator().manual_seed(0), sharding)
    return {"indices": chosen}


def _kmeans_duplicates(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    """k-means snapping when a centre's 16 nearest candidates are all taken (20 copies of one point, 24
    centres): the search over every rank's rows."""
    gen = torch.Generator().manual_seed(1)
    features = torch.cat(
        [torch.zeros(20, 2, dtype=torch.float64), torch.randn(17, 2, generator=gen, dtype=torch.float64)]
    )
    if group is None:
        return {"indices": kmeans_points(features, 24, torch.Generator().manual_seed(0))}
    sharding = ntkgp.distributed.Sharding.create(group, sl.stop - sl.start)
    return {"indices": sharded_kmeans_points(features[sl], 24, torch.Generator().manual_seed(0), sharding)}


def _inducing_laplace(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    x, _, xt = _data(1)
    lik = SoftmaxLikelihood(num_classes=3)
    model = _gp(x[sl], _labels()[sl], group, 3, Inducing(num_inducing=6), likelihood=lik, prior_precision=2.0)
    return _evidence_and_predictive(model, xt[tsl])


def _cg(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    x, y, xt = _data(2)
    spec = ConjugateGradients(tolerance=1e-12, num_probes=8, preconditioner_rank=10, variance_rank=30)
    return _evidence_and_predictive(_gp(x[sl], y[sl], group, 2, spec, prior_precision="tensor"), xt[tsl])


def _subset(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    x, y, xt = _data(2)
    model = _gp(x[sl], y[sl], group, 2, SubsetOfData(num_points=12), prior_precision="tensor")
    return _evidence_and_predictive(model, xt[tsl])


def _fit(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    """``fit_hyperparameters``: the spectral route (one group) and L-BFGS (a group per tensor), weight space."""
    x, y, xt = _data(1)
    out = {}
    for name, prior in (("spectral", 1.0), ("lbfgs", "tensor")):
        model = _gp(x[sl], y[sl], group, 1, "weight", prior_precision=prior)
        fit = ntkgp.marglik.fit_hyperparameters(model)
        out[f"{name}_method"] = torch.tensor([float(fit.method == name)])
        out[f"{name}_evidence"] = torch.tensor([fit.log_evidence])
        if name == "spectral":
            out[f"{name}_prior_precision"] = model.prior_precision.detach()
            out[f"{name}_noise"] = model.likelihood.noise.detach().reshape(-1)
        # On 37 points the per-tensor evidence prunes groups: their precisions run to 1e16-1e28 along directions
        # where the evidence is flat to round-off, so the iterates there are not identified; the evidence is.
    return out


def _partition(n: int) -> list[Tensor]:
    """Contiguous subsets of ``SUBSET`` points of ``range(n)`` (the last one shorter)."""
    return list(torch.arange(n).split(SUBSET))


def _bound(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    x, y, _ = _data(1)
    model = _gp(x[sl], y[sl], group, 1, "weight", prior_precision="tensor")
    if group is None:  # one process: the union of the ranks' partitions, and their drawn subsets
        starts = offsets + [N]
        parts = [p + a for a, b in zip(starts, starts[1:]) for p in _partition(b - a)]
        bound = SubsetEvidenceBound(model, parts)
        first = [sum(len(_partition(b - a)) for a, b in zip(starts, starts[1 : r + 1])) for r in range(len(offsets))]
        weights = [len(_partition(b - a)) / len(parts) for a, b in zip(starts, starts[1:])]
        minibatch = sum(w * bound.minibatch(i + 1) for w, i in zip(weights, first))  # see test_subset_bound
    else:
        bound = SubsetEvidenceBound(model, _partition(sl.stop - sl.start))
        minibatch = bound.minibatch(1)  # each rank its own second subset
    full = bound()
    full.backward()
    out = {"evidence": full.detach(), **_grads(model)}
    model.zero_grad()
    minibatch.backward()
    out.update({"minibatch": minibatch.detach(), **{f"minibatch_{k}": v for k, v in _grads(model).items()}})
    return out


def _tuner(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    x, y, _ = _data(1)
    x, y = x[sl], y[sl]
    world = 1 if group is None else dist.get_world_size(group)
    lik = _gaussian(1)
    net = _net(1)
    tuner = MarglikTuner(net, lik, x, y, prior_precision=torch.ones(6), steps=3, solver="weight", process_group=group)
    trained: nn.Module = net if group is None else nn.parallel.DistributedDataParallel(net, process_group=group)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-3)
    for _ in range(3):  # DDP averages the ranks' gradients: world * (this rank's NLL) + penalty is the full loss
        optimizer.zero_grad()
        nll = ntkgp.marglik.negative_log_likelihood(lik, trained(x), y)
        (world * nll + tuner.prior_penalty(trained)).backward()
        optimizer.step()
    tuner.step(trained)
    out = {"prior_precision": tuner.prior_precision.detach(), "noise": lik.noise.detach().reshape(-1)}
    if group is None:
        out["bound_prior_precision"] = _bound_tuner_reference(net, lik, x, y, offsets)
        return out
    bounded = MarglikTuner(
        net, lik, x, y, prior_precision=torch.ones(6), steps=2, subset_size=SUBSET, minibatch=True, process_group=group
    )
    bounded.step(trained)  # each rank: a random partition of its shard, one drawn subset
    out["bound_prior_precision"] = bounded.prior_precision.detach()
    return out


def _bound_tuner_reference(net: nn.Module, lik: Any, x: Tensor, y: Tensor, offsets: list[int]) -> Tensor:
    """What the sharded minibatch-bound tuner computes, in one process: the ranks' partitions and draws (each
    from a generator seeded with 0, as each rank's tuner), their unbiased combination, two Adam steps."""
    starts, parts, drawn = offsets + [N], [], []
    for a, b in zip(starts, starts[1:]):
        generator = torch.Generator().manual_seed(0)
        mine = ntkgp.marglik.random_partition(b - a, SUBSET, generator=generator)
        drawn.append((len(parts) + int(torch.randint(len(mine), (1,), generator=generator)), len(mine)))
        parts += [p + a for p in mine]
    model = ntkgp.LinearizedGP(net.eval(), lik, x, y, prior_precision=torch.ones(6))
    raw = nn.Parameter(model.covar_module.raw_prior_precision.detach().clone())
    model.covar_module.raw_prior_precision = raw
    bound = SubsetEvidenceBound(model, parts)
    optimizer = torch.optim.Adam([raw, *lik.parameters()], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        estimate = sum(count / len(parts) * bound.minibatch(i) for i, count in drawn)  # see _bound
        (-estimate / N).backward()
        optimizer.step()
    return model.prior_precision.detach()


def _refusals(sl: slice, tsl: slice, group: Any, offsets: list[int]) -> dict[str, Tensor]:
    """Sharded kernel space, GPyTorch's train-mode call and ranks with different weights raise (flags 1 when so)."""
    x, y, _ = _data(1)
    flags = []
    try:
        _gp(x[sl], y[sl], group, 1, "kernel")
        flags.append(0.0)
    except ValueError as err:
        flags.append(float("kernel-space" in str(err)))
    model = _gp(x[sl], y[sl], group, 1, "weight")
    model.train()
    try:
        model(x[sl])
        flags.append(0.0)
    except RuntimeError as err:
        flags.append(float("log_evidence" in str(err)))
    net = _net(1).eval()
    if dist.get_rank(group) == 1:  # one rank with other weights: every rank raises
        with torch.no_grad():
            net[0].bias += 1e-12
    try:
        ntkgp.LinearizedGP(net, _gaussian(1), x[sl], y[sl], solver="weight", process_group=group)
        flags.append(0.0)
    except ValueError as err:
        flags.append(float("network's weights differ" in str(err)))
    return {"flags": torch.tensor(flags)}


SCENARIOS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "weight": _weight,
    "laplace": _laplace,
    "inducing": _inducing,
    "kmeans_pool": _kmeans_pool,
    "kmeans_duplicates": _kmeans_duplicates,
    "inducing_laplace": _inducing_laplace,
    "cg": _cg,
    "subset": _subset,
    "bound": _bound,
    "fit": _fit,
    "tuner": _tuner,
}
#: per point (compared on the rank's own test points), the others replicated
PER_POINT = ("mean", "var")


def _bounds(counts: list[int], rank: int) -> slice:
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        group = dist.group.WORLD
        sl, tsl = _bounds(SHARDS[world], rank), _bounds(TEST_SHARDS[world], rank)
        offsets = [_bounds(SHARDS[world], r).start for r in range(world)]
        results = {name: fn(sl, tsl, group, offsets) for name, fn in {**SCENARIOS, "refusals": _refusals}.items()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}proc")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    size = request.param
    out = tmp_path_factory.mktemp(f"world{size}")
    torch.multiprocessing.spawn(_worker, args=(size, _free_port(), str(out)), nprocs=size, join=True)
    return size, [torch.load(out / f"rank{r}.pt") for r in range(size)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Callable[[list[int]], dict[str, Tensor]]]:
    """One-process results per scenario (keyed by the shard offsets where the scenario uses them)."""
    cache: dict[tuple[str, tuple[int, ...]], dict[str, Tensor]] = {}

    def get(name: str, offsets: list[int]) -> dict[str, Tensor]:
        key = (name, tuple(offsets) if name in ("bound", "tuner") else ())
        if key not in cache:
            cache[key] = SCENARIOS[name](slice(0, N), slice(0, N_TEST), None, offsets)
        return cache[key]

    return {name: (lambda offsets, name=name: get(name, offsets)) for name in SCENARIOS}


def _relative(a: Tensor, b: Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sharded_equals_one_process(world: tuple[int, list[dict]], one_process: dict, scenario: str) -> None:
    size, ranks = world
    offsets = [_bounds(SHARDS[size], r).start for r in range(size)]
    reference = one_process[scenario](offsets)
    for rank, results in enumerate(ranks):
        got = results[scenario]
        assert set(got) == set(reference)
        tsl = _bounds(TEST_SHARDS[size], rank)
        for key, value in got.items():
            expected = reference[key][tsl] if key in PER_POINT else reference[key]
            assert value.shape == expected.shape, (scenario, key)
            if value.dtype == torch.long:
                assert torch.equal(value, expected), (scenario, key, rank)
            else:
                assert _relative(value, expected) <= RTOL, (scenario, key, rank, _relative(value, expected))
            if key not in PER_POINT:  # replicated: bitwise equal on every rank
                assert torch.equal(value, ranks[0][scenario][key]), (scenario, key, rank)


def test_sharded_refusals(world: tuple[int, list[dict]]) -> None:
    for results in world[1]:
        assert results["refusals"]["flags"].tolist() == [1.0, 1.0, 1.0]
