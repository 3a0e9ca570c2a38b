r"""Benchmark: the subset-NTK lower bound on the Laplace log evidence, against the exact evidence.

Setup
-----
The first ``--n`` (1500) points of scikit-learn's ``load_digits`` after a stratified shuffle
(``--seed``), standardized (pixel sd floored at 1), and a float64 tanh MLP ``64-W-10``
(``--width`` W = 32, P = 2,410) trained to a MAP of
:math:`-\sum_n\log\mathrm{softmax}(f(x_n))_{y_n} + \tfrac12\sum_g\delta_g\lVert\theta_g\rVert^2`
with per-tensor :math:`\delta_g = 1` (full-batch Adam, then L-BFGS). The network becomes
``ntkgp.LinearizedGP(net, SoftmaxLikelihood(10), X, y, prior_precision=torch.ones(4))``: since
P < N C = 15,000, its exact evidence ``model.log_evidence()`` uses the weight-space solver
(Cholesky of the ``P x P`` GGN posterior precision), which is cheap; the bound never uses it.

For each subset size B in ``--sizes`` (100, 500 and N) and each partition, random
(:func:`ntkgp.marglik.random_partition`) and class-grouped
(:func:`ntkgp.marglik.class_partition`), :class:`ntkgp.marglik.SubsetEvidenceBound` is built on
the same model and evaluated. With B = N there is one subset holding all data, and the "bound"
is the un-partitioned Laplace evidence computed in kernel space: one ``NC x NC`` Cholesky with its
backward pass, while the four per-group ``NC x NC`` float64 Grams are held. Measured (N = 500):
the evaluation with its gradient peaks at about 10 such matrices, i.e. about 17 GiB for N = 1500
(``15000 x 15000``, 1.68 GiB each), and takes minutes. Any B whose estimate
(``10 (BC)^2 x 8`` bytes) exceeds 60% of ``MemAvailable`` is skipped with a message, unless
``--force``; ``--skip-full`` always leaves B = N out. Rows whose first evaluation takes longer than
``--max-repeat-seconds`` are not repeated.

What is reported, per (partition, B)
------------------------------------
* the bound, and its gap to the exact evidence (exact minus bound, nats; at least 0 by Fischer's
  inequality), also per training point;
* agreement of the gradients with respect to the prior precisions :math:`\delta` (4 of them):
  cosine similarity and relative error :math:`\lVert g_{bound} - g_{exact}\rVert/\lVert g_{exact}\rVert`
  of :math:`\partial(\cdot)/\partial\delta`, both at the training :math:`\delta`;
* the same cosine and relative error for the single-subset unbiased estimates
  (:meth:`SubsetEvidenceBound.minibatch`), averaged over all subsets (the gradient one stochastic
  step would use);
* seconds: building the bound (the subsets' Grams), one evaluation with its gradient
  (forward + backward, median of ``--repeats``), and one minibatch evaluation with its gradient
  (median over subsets). For the exact evidence: building the ``LinearizedGP`` (its
  :math:`J^\top\Lambda J`) and one evaluation with gradient.

Gradients are taken with autograd with respect to the model's raw (softplus) precisions and
converted to :math:`\partial/\partial\delta` by the softplus derivative. The machine is shared;
the JSON records the load average. ``--json PATH`` writes all numbers and the machine info.

Usage::

    flock /tmp/ntkgp-bench.lock .venv/bin/python benchmarks/subset_bound.py --json subset_bound.json
    .venv/bin/python benchmarks/subset_bound.py --n 300 --sizes 50 100 300    # quick
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ntkgp  # noqa: E402
from benchmarks.harness import (
    GiB,
    available_bytes,
    command_line,
    machine_summary,
    peak_rss_gb,
    run_record,
    write_json,
)  # noqa: E402
from ntkgp.likelihoods import SoftmaxLikelihood  # noqa: E402
from ntkgp.marglik import SubsetEvidenceBound, class_partition, random_partition  # noqa: E402

NUM_CLASSES = 10
SD_FLOOR = 1.0


def load_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` digits (stratified shuffle), standardized on themselves (sd floored at 1), float64."""
    x, y = load_digits(return_X_y=True)
    if n < len(y):
        x, _, y, _ = train_test_split(x, y, train_size=n, random_state=seed, stratify=y)
    x = (x - x.mean(0)) / np.maximum(x.std(0), SD_FLOOR)
    return torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.int64)


def train_map(width: int, x: Tensor, y: Tensor, seed: int, adam_steps: int, lbfgs_iters: int) -> nn.Sequential:
    """A ``64-width-10`` tanh MLP trained to a MAP with delta = 1 on every tensor."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, NUM_CLASSES)).double()
    params = list(net.parameters())

    def loss_fn() -> Tensor:
        return F.cross_entropy(net(x), y, reduction="sum") + 0.5 * sum(p.square().sum() for p in params)

    adam = torch.optim.Adam(params, lr=1e-2)
    for _ in range(adam_steps):
        adam.zero_grad()
        loss_fn().backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(
        params, max_iter=lbfgs_iters, line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14
    )

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    lbfgs.step(closure)
    return net.eval()


def value_and_grad(model: ntkgp.LinearizedGP, objective: Callable[[], Tensor]) -> tuple[float, Tensor, float]:
    """The objective, its gradient with respect to delta ``(G,)`` and the seconds for both."""
    raw = model.covar_module.raw_prior_precision
    start = time.perf_counter()
    value = objective()
    (grad_raw,) = torch.autograd.grad(value, raw)
    seconds = time.perf_counter() - start
    return float(value), (grad_raw / torch.sigmoid(raw.detach())).reshape(-1), seconds


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


#: measured peak of one evaluation with gradient, in (BC x BC) float64 matrices (4 Grams + 6 temporaries)
MATRICES_AT_PEAK = 10


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1500])
    parser.add_argument("--skip-full", action="store_true", help="leave out B = N (the 15000 x 15000 Cholesky)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adam-steps", type=int, default=500)
    parser.add_argument("--lbfgs-iters", type=int, default=500)
    parser.add_argument("--force", action="store_true", help="run sizes that exceed the memory guard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-repeat-seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_summary(args.threads)
    x, y = load_data(args.n, args.seed)
    n = x.shape[0]
    sizes = sorted({min(b, n) for b in args.sizes})
    if args.skip_full:
        sizes = [b for b in sizes if b < n]

    start = time.perf_counter()
    net = train_map(args.width, x, y, args.seed, args.adam_steps, args.lbfgs_iters)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        train_acc = float((net(x).argmax(-1) == y).double().mean())
    num_params = sum(p.numel() for p in net.parameters())
    names = [name for name, _ in net.named_parameters()]
    print(
        f"digits N = {n}, C = {NUM_CLASSES}, MLP 64-{args.width}-10 tanh, P = {num_params}, "
        f"trained to a MAP in {train_seconds:.1f} s (train acc {train_acc:.4f})",
        flush=True,
    )

    start = time.perf_counter()
    model = ntkgp.LinearizedGP(
        net, SoftmaxLikelihood(num_classes=NUM_CLASSES), x, y, prior_precision=torch.ones(len(names))
    )
    exact_build = time.perf_counter() - start
    exact_runs = [value_and_grad(model, model.log_evidence) for _ in range(args.repeats)]
    exact, g_exact, _ = exact_runs[0]
    exact_eval = statistics.median(r[2] for r in exact_runs)
    print(
        f"exact evidence ({model.solver.name} solver): {exact:.3f}, build {exact_build:.2f} s, "
        f"evaluation + gradient {exact_eval:.3f} s; d/d delta = {[round(v, 3) for v in g_exact.tolist()]}",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for size in sizes:
        need, free = MATRICES_AT_PEAK * (size * NUM_CLASSES) ** 2 * 8, available_bytes()
        if free is not None and need > 0.6 * free and not args.force:
            skipped.append(
                f"B = {size}: estimated peak {need / GiB:.1f} GiB > 60% of the {free / GiB:.1f} GiB "
                "available (--force runs it)"
            )
            print("  skipped " + skipped[-1], flush=True)
            continue
        for kind in ("random", "class-grouped"):
            if size == n and kind == "class-grouped":
                continue  # with B = N both partitions are the same single subset
            generator = torch.Generator().manual_seed(args.seed)
            parts = (
                random_partition(n, size, generator=generator)
                if kind == "random"
                else class_partition(y, size, generator=generator)
            )
            t0 = time.perf_counter()
            bound = SubsetEvidenceBound(model, parts)
            build = time.perf_counter() - t0
            runs = [value_and_grad(model, bound)]
            if runs[0][2] <= args.max_repeat_seconds:
                runs += [value_and_grad(model, bound) for _ in range(args.repeats - 1)]
            value, g_bound, _ = runs[0]
            if bound.num_subsets == 1:  # the estimate is the bound itself
                mb = runs[:1]
            else:
                mb = [value_and_grad(model, lambda i=i, b=bound: b.minibatch(i)) for i in range(bound.num_subsets)]
            mb_cos = [cosine(g, g_exact) for _, g, _ in mb]
            mb_err = [rel_err(g, g_exact) for _, g, _ in mb]
            classes = [len(torch.unique(y[p])) for p in parts]
            row = {
                "partition": kind if size < n else "(one subset)",
                "subset_size": size,
                "num_subsets": bound.num_subsets,
                "mean_classes_per_subset": statistics.mean(classes),
                "bound": value,
                "gap": exact - value,
                "gap_per_point": (exact - value) / n,
                "grad": g_bound.tolist(),
                "grad_cosine": cosine(g_bound, g_exact),
                "grad_rel_err": rel_err(g_bound, g_exact),
                "minibatch_grad_cosine_mean": statistics.mean(mb_cos),
                "minibatch_grad_cosine_min": min(mb_cos),
                "minibatch_grad_rel_err_mean": statistics.mean(mb_err),
                "build_seconds": build,
                "eval_seconds": statistics.median(r[2] for r in runs),
                "eval_repeats": len(runs),
                "minibatch_eval_seconds": statistics.median(r[2] for r in mb),
                "peak_rss_gb_so_far": peak_rss_gb(),
            }
            rows.append(row)
            print(
                f"  {row['partition']:>13} B={size:5d}: bound {value:.3f}, gap {row['gap']:.3f}, "
                f"cos {row['grad_cosine']:.5f}, build {build:.2f} s, eval {row['eval_seconds']:.3f} s",
                flush=True,
            )
            del bound

    print(
        f"\n### Subset bound vs exact Laplace evidence (digits N = {n}, P = {num_params}, "
        f"exact = {exact:.3f}; gradients w.r.t. the {len(names)} per-tensor prior precisions)\n"
    )
    print(
        "| partition | B | subsets | classes / subset | bound | gap (nats) | gap / N | grad cos | grad rel. err "
        "| minibatch grad cos / rel. err (mean) | build (s) | eval+grad (s) | minibatch eval+grad (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| exact ({model.solver.name} space) | - | - | - | {exact:.3f} | 0 | 0 | 1 | 0 | - | {exact_build:.2f} | "
        f"{exact_eval:.3f} | - |"
    )
    for r in rows:
        print(
            f"| {r['partition']} | {r['subset_size']} | {r['num_subsets']} | {r['mean_classes_per_subset']:.1f} | "
            f"{r['bound']:.3f} | {r['gap']:.3f} | {r['gap_per_point']:.4f} | {r['grad_cosine']:.5f} | "
            f"{r['grad_rel_err']:.4f} | {r['minibatch_grad_cosine_mean']:.4f} / "
            f"{r['minibatch_grad_rel_err_mean']:.3f} | {r['build_seconds']:.2f} | "
            f"{r['eval_seconds']:.3f} | {r['minibatch_eval_seconds']:.3f} |"
        )
    for line in skipped:
        print(f"\nNot measured: {line}.")
    print("\nd(exact)/d delta = " + ", ".join(f"{name}: {g:.4g}" for name, g in zip(names, g_exact.tolist())))
    print(
        f"Peak RSS {peak_rss_gb():.2f} GB; load average before {machine['load_average_1_5_15']}, "
        f"after {list(os.getloadavg())}."
    )
    report = {
        **run_record(machine, args),
        "num_data": n,
        "num_parameters": num_params,
        "parameter_names": names,
        "train_accuracy": train_acc,
        "exact": {
            "log_evidence": exact,
            "grad": g_exact.tolist(),
            "solver": model.solver.name,
            "build_seconds": exact_build,
            "eval_seconds": exact_eval,
        },
        "rows": rows,
        "skipped": skipped,
        "peak_rss_gb": peak_rss_gb(),
        "command": command_line(),
    }
    if not all(math.isfinite(r["bound"]) for r in rows):
        print("warning: a non-finite bound")
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
