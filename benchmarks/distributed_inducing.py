r"""Benchmark (issue 18): the inducing-point route with the training data sharded over 1, 2 and 4 processes.

Setup (as ``regression_workflow.py``): Friedman-1 (``make_friedman1(n_samples=N + n_test,
n_features=8, noise=1.0, random_state=0)``), inputs and targets standardized on the training rows;
the 8-256-256-1 tanh MLP in float32 (P = 68,353), trained briefly (full-batch Adam on the first
``--train-n`` rows: what is measured is the GP, not the network). ``ntkgp.solvers.Inducing`` with
``M = --m`` inducing points (k-means), at δ = 1 and σ² = the network's training MSE.

Each configuration runs in fresh processes started by ``torch.multiprocessing.spawn``: ``W``
ranks in a gloo group on this machine (CPU), each with ``torch.set_num_threads(--threads)``
(default 1) and ``N / W`` contiguous training rows (``ntkgp.distributed.shard_range``);
``W = 1`` is the plain one-process code (``process_group=None``), the baseline. Imports, the
rendezvous, loading and one untimed warm-up on 64 points per rank are outside the clock. Phases
(each ends with a barrier, so it is the slowest rank's time):

* ``kmeans``: the ``LinearizedGP`` (with the sharding's checks) and
  ``select_inducing_points("kmeans", ...)`` on its problem (sharded k-means over the ranks);
* ``pass``: the solver with those points (Z gathered, K_ZZ, the per-group traces) and the first
  evidence (the data pass accumulating :math:`\Phi = K_{ZX}S^{-1}K_{XZ}` and :math:`K_{ZX}S^{-1}r`,
  all-reduced);
* ``build`` = ``kmeans`` + ``pass``: everything that touches the N points;
* ``evidence+grad``: another evidence and its backward pass (independent of N);
* ``predict``: mean and variance at the rank's share of ``--n-test`` test points.

Reported per N and W: median wall seconds over ``--repeats`` (the W run in turn within each
repeat, so drift of the machine's load touches all alike), the parallel efficiency of the build
:math:`E_W = T_1 / (W\,T_W)` from the medians, and, because this machine may be shared, the same from
CPU seconds (the ranks' summed user + system time: what sharding costs in work, whatever the
contention), the load average around each run, and the largest relative difference of the evidence
and of the predictive mean and variance to ``W = 1`` (float32 network, float64 algebra), next to
the same differences between two one-process runs whose data passes are chunked differently
(a ``memory_budget`` that makes ten chunks): how far round-off alone moves the result.

Usage::

    .venv/bin/python benchmarks/distributed_inducing.py --json dist.json                 # N = 50k and 200k
    .venv/bin/python benchmarks/distributed_inducing.py --n 20000 --repeats 1 --m 200     # quick
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import finish_report, start_report  # noqa: E402
from benchmarks.regression_workflow import load_setup, make_data, make_net, rmse, save_setup, train_net  # noqa: E402

PHASES = ("kmeans", "pass", "evidence+grad", "predict")
#: bytes per row and inducing point the inducing solver's data pass takes of the memory budget (one group and
#: output), for the one-process yardstick run whose pass runs in chunks of n / 10 rows
YARDSTICK_BYTES_PER_ROW = 32


def _barrier(group: Any) -> None:
    if group is not None:
        dist.barrier(group)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _gp(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, noise: float, spec: Any, group: Any, budget: int | None
) -> Any:
    import gpytorch

    import ntkgp

    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = noise
    return ntkgp.LinearizedGP(
        net, likelihood, x, y, prior_precision=1.0, solver=spec, process_group=group, memory_budget=budget
    )


def _measure(
    rank: int, world: int, port: int, setup: str, m: int, threads: int, affinity: bool, budget: int | None, out: str
) -> None:
    """One configuration on one rank: the phases, the evidence and this rank's predictions, saved to ``out``."""
    from ntkgp.distributed import shard_range
    from ntkgp.solvers import Inducing
    from ntkgp.solvers.inducing import select_inducing_points

    torch.set_num_threads(threads)
    if affinity and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    group = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(hours=1)
        )
        group = dist.group.WORLD
    net, data, settings = load_setup(setup, double=False)
    mine = shard_range(data["x"].shape[0], rank, world)
    tests = shard_range(data["x_test"].shape[0], rank, world)
    x, y = data["x"][mine.start : mine.stop], data["y"][mine.start : mine.stop]
    x_test = data["x_test"][tests.start : tests.stop]
    noise = settings["noise"]
    warm = _gp(net, x[:64], y[:64], noise, Inducing(num_inducing=8), group, budget)  # untimed: first-call costs
    warm.log_evidence().backward()
    _barrier(group)

    times: dict[str, float] = {}
    cpu0, clock = _cpu_seconds(), time.perf_counter()

    def mark(phase: str) -> None:
        nonlocal clock
        _barrier(group)
        now = time.perf_counter()
        times[phase] = now - clock
        clock = now

    spec = Inducing(num_inducing=m)
    model = _gp(net, x, y, noise, spec, group, budget)
    indices = select_inducing_points("kmeans", model.problem, m)  # what model.solver would do, timed apart
    spec.selection = indices  # the solver, built next, takes these points
    mark("kmeans")
    evidence = model.log_evidence()  # the solver (Z, K_ZZ, traces) and the data pass for Phi
    mark("pass")
    model.zero_grad()
    model.log_evidence().backward()
    mark("evidence+grad")
    post = model.posterior()
    mean, var = post.mean(x_test)[:, 0], post.covariance_diagonal(x_test)
    mark("predict")
    cpu = _cpu_seconds() - cpu0
    cpus = [cpu]
    if group is not None:
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(gathered, torch.tensor([cpu], dtype=torch.float64))
        cpus = [float(c) for c in gathered]
    result = {
        "times": times,
        "cpu_seconds": sum(cpus),
        "evidence": float(evidence.detach()),
        "mean": mean.detach().double(),
        "var": var.detach().double(),
        "indices": indices,
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if group is not None:
        _barrier(group)  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_configuration(setup: str, world: int, args: argparse.Namespace, budget: int | None = None) -> dict[str, Any]:
    """Spawn ``world`` ranks for one measurement; the slowest rank's phase times and every rank's predictions."""
    with tempfile.TemporaryDirectory() as out:
        load_before = os.getloadavg()[0]
        torch.multiprocessing.spawn(
            _measure,
            args=(world, _free_port(), setup, args.m, args.threads, args.affinity, budget, out),
            nprocs=world,
            join=True,
        )
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
    times = dict(ranks[0]["times"])
    times["build"] = times["kmeans"] + times["pass"]
    return {
        "world": world,
        "times": times,
        "cpu_seconds": ranks[0]["cpu_seconds"],
        "evidence": ranks[0]["evidence"],
        "mean": torch.cat([r["mean"] for r in ranks]),
        "var": torch.cat([r["var"] for r in ranks]),
        "indices": ranks[0]["indices"],
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def benchmark_n(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train (briefly), then ``--repeats`` rounds of every W for one N."""
    torch.manual_seed(0)
    data = make_data(n, args.n_test)
    net = make_net()
    train_rmse = train_net(net, data["x"][: args.train_n], data["y"][: args.train_n], 1.0, args.train_steps)
    noise = rmse(net, data["x"], data["y"]) ** 2
    setup = save_setup(workdir, net, data, {"n": n, "noise": noise, "train_rmse": train_rmse})
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in args.processes}
    for repeat in range(args.repeats):
        for world in args.processes:
            run = run_configuration(setup, world, args)
            runs[world].append(run)
            print(
                f"N={n} W={world} repeat {repeat}: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in run["times"].items())
                + f", cpu {run['cpu_seconds']:.1f} s, load {run['load_before']:.2f} -> {run['load_after']:.2f}",
                flush=True,
            )
    base = runs[min(args.processes)]
    # the yardstick: one process again, with the data pass in chunks of another size (another summation order)
    budget = YARDSTICK_BYTES_PER_ROW * args.m * max(1, n // 10)  # about ten chunks of n / 10 rows
    other = run_configuration(setup, 1, args, budget=budget)
    table: dict[str, Any] = {
        "n": n,
        "noise": noise,
        "configurations": [],
        "yardstick": {
            "memory_budget": budget,
            "evidence_rel_diff": abs(other["evidence"] - base[0]["evidence"]) / abs(base[0]["evidence"]),
            "mean_rel_diff": _relative(other["mean"], base[0]["mean"]),
            "var_rel_diff": _relative(other["var"], base[0]["var"]),
        },
    }
    t1 = {p: statistics.median(r["times"][p] for r in base) for p in (*PHASES, "build")}
    cpu1 = statistics.median(r["cpu_seconds"] for r in base)
    for world in args.processes:
        rs = runs[world]
        med = {p: statistics.median(r["times"][p] for r in rs) for p in (*PHASES, "build")}
        cpu = statistics.median(r["cpu_seconds"] for r in rs)
        table["configurations"].append(
            {
                "world": world,
                "median_seconds": med,
                "all_seconds": [r["times"] for r in rs],
                "median_cpu_seconds": cpu,
                "build_efficiency": t1["build"] / (world * med["build"]),
                "pass_efficiency": t1["pass"] / (world * med["pass"]),
                "kmeans_efficiency": t1["kmeans"] / (world * med["kmeans"]),
                "cpu_efficiency": cpu1 / cpu,
                "evidence": rs[0]["evidence"],
                "evidence_rel_diff": abs(rs[0]["evidence"] - base[0]["evidence"]) / abs(base[0]["evidence"]),
                "mean_rel_diff": _relative(rs[0]["mean"], base[0]["mean"]),
                "var_rel_diff": _relative(rs[0]["var"], base[0]["var"]),
                "same_inducing_points": bool(torch.equal(rs[0]["indices"], base[0]["indices"])),
                "load": [(r["load_before"], r["load_after"]) for r in rs],
            }
        )
    return table


def markdown(tables: list[dict[str, Any]]) -> str:
    lines = [
        "| N | W | k-means s | pass s | build s | E_build | E_cpu | evidence+grad s | predict s | "
        "evidence diff | mean diff | var diff | same Z | load (1-min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tables:
        for c in t["configurations"]:
            s = c["median_seconds"]
            loads = [f"{a:.1f}-{b:.1f}" for a, b in c["load"]]
            lines.append(
                f"| {t['n']:,} | {c['world']} | {s['kmeans']:.1f} | {s['pass']:.1f} | {s['build']:.1f} | "
                f"{c['build_efficiency']:.2f} | {c['cpu_efficiency']:.2f} | {s['evidence+grad']:.2f} | "
                f"{s['predict']:.2f} | {c['evidence_rel_diff']:.1e} | {c['mean_rel_diff']:.1e} | "
                f"{c['var_rel_diff']:.1e} | {'yes' if c['same_inducing_points'] else 'no'} | {', '.join(loads)} |"
            )
        y = t["yardstick"]
        lines.append(
            f"| {t['n']:,} | 1, other chunks | | | | | | | | {y['evidence_rel_diff']:.1e} | {y['mean_rel_diff']:.1e} | "
            f"{y['var_rel_diff']:.1e} | yes | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[50_000, 200_000], help="training points")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4], help="ranks W (the first is the base)")
    parser.add_argument("--m", type=int, default=500, help="inducing points")
    parser.add_argument("--n-test", type=int, default=1000, help="test points (sharded)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every W (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--affinity", action="store_true", help="pin rank r to core r mod cores")
    parser.add_argument("--train-n", type=int, default=2000, help="rows the network is trained on")
    parser.add_argument("--train-steps", type=int, default=300, help="full-batch Adam steps of the network")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    report, started = start_report(args)
    tables = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in args.n:
            tables.append(benchmark_n(n, args, Path(workdir)))
            print(markdown(tables), flush=True)
    report["results"] = tables
    print()
    print(markdown(tables))
    finish_report(report, started, args.json)


if __name__ == "__main__":
    main()
