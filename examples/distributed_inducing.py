r"""The inducing-point GP of a trained network, with the training data sharded over processes.

What it shows
-------------
1. Every process (rank) holds its own shard of a 1-D regression data set (uneven shards), as in
   ``DistributedDataParallel``: the network (a tanh MLP, float64) is trained with DDP, so every
   rank ends with the same weights.
2. ``ntkgp.LinearizedGP(..., solver=Inducing(num_inducing=M), process_group=WORLD)`` on each rank's
   shard: the inducing points are chosen by k-means over all ranks, the inducing-point statistics
   are all-reduced, and every rank holds the same collapsed bound and posterior. The prior
   precision and the noise then take Adam steps on ``model.log_evidence()``; its gradients flow
   through the all-reduces and are the same on every rank.
3. Each rank predicts its own share of the test grid; rank 0 gathers the predictions, builds the
   same GP in one process on all the data to compare (the evidence and the predictive, printed as
   the largest relative differences), and plots the predictive (``distributed_inducing.png``),
   the training points coloured by the rank that holds them. The sharded sums add the same terms
   in another order; how far that moves the result depends on the conditioning of :math:`K_{ZZ}`
   (a smooth 1-D NTK: condition numbers of 1e14 before the jitter), so the script also prints how
   far one process moves from itself when the data come in reverse order (same inducing points).

Run it with ``torchrun --nproc_per_node=2 examples/distributed_inducing.py`` (gloo on CPUs; with
one GPU per process, NCCL on ``cuda:LOCAL_RANK``). Without torchrun (``python
examples/distributed_inducing.py``) it starts two gloo processes itself. ``--smoke`` shrinks the
data, the network and the steps (:data:`SMOKE`) for a seconds-long test run through the same code.
See ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
from datetime import timedelta

import gpytorch
import matplotlib
import torch
import torch.distributed as dist
from torch import Tensor, nn

import ntkgp
from ntkgp.distributed import shard_range
from ntkgp.solvers import Inducing

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: ``--smoke``: option values of a seconds-long run through the same code (the test suite runs it)
SMOKE = {"n": 120, "m": 8, "width": 8, "map_steps": 30, "steps": 3, "n_test": 40}
#: weight decay of the MAP fit, and the GP's initial prior precision
PRIOR_PRECISION = 1.0


def make_data(n: int, n_test: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` noisy points of :math:`\\sin(3x)` on [-2, 2] with a gap at [0.3, 0.9], and a test grid on [-2.5, 2.5]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * n, 1, generator=g, dtype=torch.float64) * 4 - 2
    x = x[(x[:, 0] < 0.3) | (x[:, 0] > 0.9)][:n].sort(0).values  # sorted: each rank holds one stretch of x
    y = torch.sin(3 * x[:, 0]) + 0.1 * torch.randn(x.shape[0], generator=g, dtype=torch.float64)
    return x, y, torch.linspace(-2.5, 2.5, n_test, dtype=torch.float64)[:, None]


def make_net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same weights on every rank (DDP would broadcast rank 0's anyway)
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def shards(n: int, world: int) -> list[range]:
    """Uneven contiguous shards: rank ``r`` gets a share proportional to ``r + 2``."""
    weights = [r + 2 for r in range(world)]
    cuts = [0] + [round(n * sum(weights[: r + 1]) / sum(weights)) for r in range(world)]
    return [range(cuts[r], cuts[r + 1]) for r in range(world)]


def train_map(net: nn.Module, x: Tensor, y: Tensor, steps: int, world: int) -> None:
    """Adam on :math:`\\tfrac{1}{2\\sigma^2}\\lVert y - f\\rVert^2 + \\tfrac{\\delta}{2}\\lVert\\theta\\rVert^2` with
    DDP: each rank's loss is ``world`` times its data term plus the penalty, so DDP's average is the full
    gradient."""
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        data = 0.5 * (y - ddp(x)[:, 0]).square().sum() / 0.01
        penalty = 0.5 * PRIOR_PRECISION * sum(p.square().sum() for p in net.parameters())
        (world * data + penalty).backward()
        opt.step()


def fitted_gp(net: nn.Module, x: Tensor, y: Tensor, m: int, steps: int, group: object) -> ntkgp.LinearizedGP:
    """The inducing-point GP on ``(x, y)`` (this rank's shard with a ``group``), after ``steps`` Adam steps on
    its evidence (every rank the same)."""
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double().to(x.device)
    likelihood.noise = 0.05
    model = ntkgp.LinearizedGP(
        net.eval(), likelihood, x, y, PRIOR_PRECISION, solver=Inducing(num_inducing=m), process_group=group
    )
    total = model.total_data
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (-model.log_evidence() / total).backward()
        opt.step()
    return model


def predict(model: ntkgp.LinearizedGP, x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance (latent plus noise) at ``x``, from the posterior (no communication once it exists)."""
    post = model.posterior()
    noise = model.likelihood.noise.detach().reshape(-1)[0]
    return post.mean(x)[:, 0], post.covariance_diagonal(x) + noise


def relative(a: Tensor, b: Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``b``."""
    return float((a - b).abs().max() / b.abs().max())


def run(args: argparse.Namespace) -> None:
    """The example on every rank (the process group is initialized)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dist.get_backend() == "nccl"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    x_all, y_all, x_test_all = (t.to(device) for t in make_data(args.n, args.n_test, args.seed))
    mine, test_mine = shards(x_all.shape[0], world)[rank], shard_range(x_test_all.shape[0], rank, world)
    x, y = x_all[mine.start : mine.stop], y_all[mine.start : mine.stop]  # this rank's shard, all it uses

    net = make_net(args.width, args.seed).double().to(device)
    train_map(net, x, y, args.map_steps, world)
    model = fitted_gp(net, x, y, args.m, args.steps, dist.group.WORLD)
    evidence = model.log_evidence().detach()
    mean, var = predict(model, x_test_all[test_mine.start : test_mine.stop])

    # rank 0 gathers every rank's predictions (padded to the longest share) for the check and the plot
    sizes = [len(shard_range(x_test_all.shape[0], r, world)) for r in range(world)]
    width = max(sizes)
    padded = torch.zeros(width, 2, dtype=torch.float64, device=device)
    padded[: mean.shape[0]] = torch.stack([mean, var], 1)
    everything = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(everything, padded)
    if rank != 0:
        return
    predicted = torch.cat([p[:s] for p, s in zip(everything, sizes)])
    delta, noise = model.prior_precision.detach(), model.likelihood.noise.detach()
    print(f"{world} processes, shards of {[len(s) for s in shards(x_all.shape[0], world)]} points")
    print(
        f"log evidence (collapsed bound) {float(evidence):.6f}; delta {float(delta[0]):.4f}, noise {float(noise):.5f}"
    )

    # the same GP in one process on all the data, at the same hyperparameters (a check only); and once more
    # with the data in reverse order and the same inducing points: how far round-off alone moves it
    runs: list[tuple[Tensor, Tensor, Tensor, ntkgp.LinearizedGP]] = []
    for order, spec in ((None, Inducing(num_inducing=args.m)), ("reversed", None)):
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double().to(device)
        likelihood.noise = noise
        xs, ys = (x_all, y_all) if order is None else (x_all.flip(0), y_all.flip(0))
        if spec is None:
            spec = Inducing(num_inducing=args.m, selection=x_all.shape[0] - 1 - runs[0][3].solver.indices)
        single = ntkgp.LinearizedGP(net.eval(), likelihood, xs, ys, delta, solver=spec)
        with torch.no_grad():
            runs.append((single.log_evidence(), *predict(single, x_test_all), single))
    (e1, m1, v1, single), (e2, m2, v2, _) = runs
    print(
        f"max relative difference to one process: evidence {relative(evidence, e1):.1e}, "
        f"mean {relative(predicted[:, 0], m1):.1e}, variance {relative(predicted[:, 1], v1):.1e}"
    )
    print(
        f"(one process against itself, data reversed: evidence {relative(e2, e1):.1e}, mean {relative(m2, m1):.1e}, "
        f"variance {relative(v2, v1):.1e})"
    )
    plot(args.out, x_all.cpu(), y_all.cpu(), x_test_all.cpu(), predicted.cpu(), world, single.solver)


def plot(out: str, x: Tensor, y: Tensor, x_test: Tensor, predicted: Tensor, world: int, solver: object) -> None:
    mean, sd = predicted[:, 0], predicted[:, 1].sqrt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.fill_between(x_test[:, 0], mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.2, label="±2 sd (with noise)")
    ax.plot(x_test[:, 0], mean, color="C0", label="predictive mean")
    for r, shard in enumerate(shards(x.shape[0], world)):
        ax.scatter(
            x[shard.start : shard.stop, 0], y[shard.start : shard.stop], s=6, color=f"C{r + 1}", label=f"rank {r}"
        )
    z = getattr(solver, "indices", None)
    if z is not None:
        ax.scatter(x[z.cpu(), 0], torch.full((z.numel(),), -1.9), marker="|", color="k", label="inducing points")
    ax.set(xlabel="x", ylabel="y", title=f"inducing-point NTK GP, data sharded over {world} processes")
    ax.set_ylim(-2.6, 2.2)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(minutes=5)
    )
    try:
        run(args)
        dist.barrier()  # no rank tears the group down while another still uses it (gloo can abort the other)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="distributed_inducing.png", help="path of the figure (rank 0)")
    parser.add_argument("--n", type=int, default=4000, help="training points over all ranks")
    parser.add_argument("--n-test", type=int, default=200, help="test points over all ranks")
    parser.add_argument("--m", type=int, default=40, help="inducing points")
    parser.add_argument("--width", type=int, default=32, help="hidden units per layer")
    parser.add_argument("--map-steps", type=int, default=1500, help="DDP Adam steps of the MAP fit")
    parser.add_argument("--steps", type=int, default=30, help="Adam steps on the evidence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the network")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--processes", type=int, default=2, help="processes to start without torchrun")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE) for a seconds-long test run")
    args = parser.parse_args(argv)
    if args.smoke:  # the SMOKE values replace the defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend)
        try:
            run(args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:  # plain python: start our own gloo group on this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.processes, port, args), nprocs=args.processes, join=True)


if __name__ == "__main__":
    main()
