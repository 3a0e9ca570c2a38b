r"""Benchmark: online marginal-likelihood training versus a weight-decay grid search, on digits.

Setup
-----
scikit-learn's ``load_digits`` (1797 images of 8x8 pixels, 10 classes) is split, stratified with
``--seed``, into 1077 training, 360 validation and 360 test points, and standardized with the
training pixels' mean and standard deviation (floored at 1 pixel unit, since some border pixels
are almost always 0). The network is a float32 MLP ``64-W-...-W-10`` (``--width`` W = 100,
``--depth`` 2 hidden layers, ``--activation`` tanh; P = 17,610 by default) with the same
initialization (``--seed``) for every run.

Every run trains the same way: Adam (``--lr``) over shuffled mini-batches of ``--batch-size``
for ``--epochs`` epochs on
:math:`\tfrac{N}{|b|}\,\mathrm{NLL}_b + \tfrac12\sum_g\delta_g\lVert\theta_g\rVert^2`.

* **grid search**: one scalar prior precision (weight decay) :math:`\delta`, fixed, for each
  value of ``--grid`` (8 log-spaced values, 0.01 to 1000, by default; :math:`\delta` is on the
  summed loss, i.e. a weight decay of :math:`\delta/N` on the mean loss). These are plain training
  runs, by :func:`train_plain`, a copy of ``fit_online_marglik``'s loop without the tuner (same
  shuffling from the same generator, same loss, same optimizer): ``fit_online_marglik`` with
  ``burnin = epochs`` would do the same but its ``MarglikTuner`` turns a prior precision above
  about 709 into ``inf`` (see the report). The value with the lowest validation NLL is selected
  (accuracy is reported too).
* **online marglik**: one :math:`\delta` per parameter tensor (``prior_precision=torch.ones(6)``:
  weight and bias of each layer), starting at 1, tuned during training by
  ``fit_online_marglik`` with ``SoftmaxLikelihood`` and the subset-NTK lower bound
  (``subset_size``, class-grouped partitions drawn afresh at each marglik step). The marglik
  settings are the library's defaults (``marglik_every=5``, ``burnin=10``, ``steps=10``,
  ``hyper_lr=0.1``) unless given on the command line. The online model does not use the
  validation split.

``MarglikTuner.step`` builds a :class:`ntkgp.LinearizedGP` at every step; its exact solver is
built lazily, so with ``subset_size`` a step costs what the bound costs (the exact solver would
be six ``10770 x 10770`` float64 Grams).

``--minibatch-variant`` adds a second online run with ``minibatch=True``: each Adam step of the
tuner uses one subset's unbiased estimate (:meth:`SubsetEvidenceBound.minibatch`) instead of the
whole bound, and only the drawn subsets' Grams are built (same loop, same defaults otherwise).

What is reported
----------------
* test accuracy and mean test NLL of the grid winner (MAP plug-in softmax) and of the online
  model: its MAP plug-in, and the linearized-Laplace GP predictive, built post hoc as
  ``ntkgp.LinearizedGP(net, SoftmaxLikelihood(10), train_x, train_y,
  prior_precision=result.prior_precision)`` (probit approximation); the same GP is also built for
  the grid winner at its :math:`\delta` unless ``--no-grid-gp``. Each GP's exact Laplace log
  evidence (``model.log_evidence()``) is reported as well. With P > N C these GPs use the
  kernel-space solver: an ``(N C)^2`` Cholesky, about 9 GB of memory and 1-2 minutes each.
* the selected :math:`\delta` and the learned per-tensor :math:`\delta`\ s;
* wall-clock time (``time.perf_counter``) of the online run (whole run, and its marglik steps
  alone) against ONE plain training run: the median of the grid's runs, which all do the same
  work. ``--repeats`` repeats the online run and reports the median. The target is online
  time at most twice one plain run. For reference, the time of ``fit_online_marglik``'s own loop
  with no marglik step (``burnin = epochs``) is printed too.

The machine is shared: the JSON records the load average before and after, which inflates all
timings alike but not evenly. Results go to stdout as Markdown tables and, with ``--json PATH``,
to a JSON file with the machine info and every run's history.

Usage::

    flock /tmp/ntkgp-bench.lock .venv/bin/python benchmarks/online_marglik_digits.py --json digits.json
    .venv/bin/python benchmarks/online_marglik_digits.py --epochs 20 --grid 0.1 10 --no-gp   # quick
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
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
from benchmarks.harness import command_line, machine_summary, run_record, write_json  # noqa: E402
from ntkgp.likelihoods import SoftmaxLikelihood  # noqa: E402
from ntkgp.marglik import fit_online_marglik  # noqa: E402

NUM_CLASSES = 10
SD_FLOOR = 1.0


# --------------------------------------------------------------------------- setup
@dataclass
class Split:
    """Standardized digits splits, float32 inputs and int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(seed: int) -> Split:
    """Digits split 60/20/20 (stratified), standardized on the training pixels (sd floored at 1)."""
    x, y = load_digits(return_X_y=True)
    x_rest, x_te, y_rest, y_te = train_test_split(x, y, test_size=360, random_state=seed, stratify=y)
    x_tr, x_va, y_tr, y_va = train_test_split(x_rest, y_rest, test_size=360, random_state=seed, stratify=y_rest)
    mean, sd = x_tr.mean(0), np.maximum(x_tr.std(0), SD_FLOOR)

    def fx(a: np.ndarray) -> Tensor:
        return torch.as_tensor((a - mean) / sd, dtype=torch.float32)

    def fy(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    return Split(fx(x_tr), fy(y_tr), fx(x_va), fy(y_va), fx(x_te), fy(y_te))


def make_net(width: int, depth: int, activation: str, seed: int) -> nn.Sequential:
    """``64-width-...-width-10`` MLP (``depth`` hidden layers), float32, initialized from ``seed``."""
    torch.manual_seed(seed)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    d_in = 64
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), act()]
        d_in = width
    layers.append(nn.Linear(d_in, NUM_CLASSES))
    return nn.Sequential(*layers).float()


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def map_metrics(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy and mean NLL of the network's own softmax."""
    net.eval()
    logits = net(x)
    return {"acc": float((logits.argmax(-1) == y).float().mean()), "nll": float(F.cross_entropy(logits.double(), y))}


def gp_metrics(net: nn.Module, data: Split, prior_precision: Tensor) -> dict[str, Any]:
    """Post-hoc LinearizedGP (probit predictive): test accuracy and NLL, log evidence, seconds."""
    start = time.perf_counter()
    likelihood = SoftmaxLikelihood(num_classes=NUM_CLASSES)
    model = ntkgp.LinearizedGP(
        net.eval(), likelihood, data.x_train, data.y_train, prior_precision=prior_precision.detach().clone()
    )
    with torch.no_grad():
        log_evidence = float(model.log_evidence())
        model.eval()
        probs = likelihood(model(data.x_test)).probs
    p_true = probs.gather(-1, data.y_test.unsqueeze(-1)).squeeze(-1)
    return {
        "acc": float((probs.argmax(-1) == data.y_test).double().mean()),
        "nll": float(-p_true.clamp_min(1e-300).log().mean()),
        "log_evidence": log_evidence,
        "solver": model.solver.name,
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- runs
def train_online(args: argparse.Namespace, data: Split, minibatch: bool = False) -> tuple[nn.Module, Any]:
    """One ``fit_online_marglik`` run, per-tensor prior precisions starting at 1."""
    net = make_net(args.width, args.depth, args.activation, args.seed)
    likelihood = SoftmaxLikelihood(num_classes=NUM_CLASSES)
    groups = len(list(net.parameters()))
    result = fit_online_marglik(
        net,
        likelihood,
        data.x_train,
        data.y_train,
        prior_precision=torch.ones(groups),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        progress=False,
        generator=torch.Generator().manual_seed(args.seed),
        marglik_every=args.marglik_every,
        burnin=args.burnin,
        steps=args.hyper_steps,
        hyper_lr=args.hyper_lr,
        subset_size=args.subset_size,
        minibatch=minibatch,
    )
    return net.eval(), result


def time_library_loop(args: argparse.Namespace, data: Split) -> float:
    """Seconds of ``fit_online_marglik`` with no marglik step (``burnin = epochs``), delta = 1: its loop's cost."""
    net = make_net(args.width, args.depth, args.activation, args.seed)
    result = fit_online_marglik(
        net,
        SoftmaxLikelihood(num_classes=NUM_CLASSES),
        data.x_train,
        data.y_train,
        prior_precision=torch.ones(len(list(net.parameters()))),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        progress=False,
        generator=torch.Generator().manual_seed(args.seed),
        burnin=args.epochs,
    )
    return result.seconds


def train_plain(args: argparse.Namespace, data: Split, delta: float) -> tuple[nn.Module, float, float]:
    """``fit_online_marglik``'s loop without the tuner, at a fixed scalar ``delta``.

    Returns the network, the wall-clock seconds and the last epoch's mean loss.
    """
    net = make_net(args.width, args.depth, args.activation, args.seed).to(data.x_train.device)
    generator = torch.Generator().manual_seed(args.seed)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    start = time.perf_counter()
    total = math.nan
    for _ in range(args.epochs):
        net.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for idx in order.split(args.batch_size):
            optimizer.zero_grad()
            nll = F.cross_entropy(net(x[idx]), y[idx], reduction="sum")
            loss = nll * (n / idx.numel()) + 0.5 * delta * sum(p.square().sum() for p in params)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel() / n
    return net.eval(), time.perf_counter() - start, total


def run_online(args: argparse.Namespace, data: Split, minibatch: bool) -> dict[str, Any]:
    """The online run (``--repeats`` times for the timing), its metrics and post-hoc GP."""
    times, marglik_times = [], []
    net, result = None, None
    for _ in range(args.repeats):
        net, result = train_online(args, data, minibatch=minibatch)
        times.append(result.seconds)
        marglik_times.append(result.marglik_seconds)
    assert net is not None and result is not None
    out: dict[str, Any] = {
        "name": "online marglik" + (" (minibatch tuner)" if minibatch else ""),
        "seconds": statistics.median(times),
        "seconds_all": times,
        "marglik_seconds": statistics.median(marglik_times),
        "prior_precision": result.prior_precision.tolist(),
        "map": {"val": map_metrics(net, data.x_val, data.y_val), "test": map_metrics(net, data.x_test, data.y_test)},
        "tuner_history": result.tuner.history,
        "final_loss": result.history[-1]["loss"],
    }
    if not args.no_gp:
        out["gp"] = gp_metrics(net, data, result.prior_precision)
    return out


def run_grid(args: argparse.Namespace, data: Split) -> list[dict[str, Any]]:
    """Plain runs, one per scalar delta of ``--grid``."""
    rows = []
    for delta in args.grid:
        net, seconds, final_loss = train_plain(args, data, float(delta))
        rows.append(
            {
                "delta": float(delta),
                "seconds": seconds,
                "val": map_metrics(net, data.x_val, data.y_val),
                "test": map_metrics(net, data.x_test, data.y_test),
                "final_loss": final_loss,
                "_net": net,
            }
        )
        print(f"  grid delta={delta:g}: val nll {rows[-1]['val']['nll']:.4f}, {seconds:.1f} s", flush=True)
    return rows


# --------------------------------------------------------------------------- report
def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--activation", choices=["tanh", "relu"], default="tanh")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grid", type=float, nargs="+", default=[float(v) for v in np.logspace(-2, 3, 8)])
    parser.add_argument("--subset-size", type=int, default=50, help="points per subset of the bound (0: exact)")
    parser.add_argument("--marglik-every", type=int, default=5)
    parser.add_argument("--burnin", type=int, default=10)
    parser.add_argument("--hyper-steps", type=int, default=10)
    parser.add_argument("--hyper-lr", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=1, help="online runs for the median time")
    parser.add_argument("--minibatch-variant", action="store_true", help="also run the minibatch-estimate tuner")
    parser.add_argument("--no-gp", action="store_true", help="skip the post-hoc LinearizedGPs")
    parser.add_argument("--no-grid-gp", action="store_true", help="skip the grid winner's LinearizedGP")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.subset_size == 0:
        args.subset_size = None
    torch.set_num_threads(args.threads)
    machine = machine_summary(args.threads)
    data = load_data(args.seed)
    net0 = make_net(args.width, args.depth, args.activation, args.seed)
    num_params = sum(p.numel() for p in net0.parameters())
    print(
        f"digits: N train/val/test = {len(data.y_train)}/{len(data.y_val)}/{len(data.y_test)}, "
        f"MLP 64-{'-'.join([str(args.width)] * args.depth)}-10 {args.activation}, P = {num_params}, "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}",
        flush=True,
    )
    start = time.perf_counter()

    print("grid search (plain runs):", flush=True)
    grid = run_grid(args, data)
    best = min(grid, key=lambda r: r["val"]["nll"])
    plain_seconds = statistics.median(r["seconds"] for r in grid)
    grid_gp = None
    if not args.no_gp and not args.no_grid_gp:
        grid_gp = gp_metrics(best["_net"], data, torch.tensor(best["delta"]))
    for row in grid:
        del row["_net"]

    library_loop_seconds = time_library_loop(args, data)
    onlines = []
    for minibatch in [False, True] if args.minibatch_variant else [False]:
        print(f"online marglik{' (minibatch tuner)' if minibatch else ''} ...", flush=True)
        onlines.append(run_online(args, data, minibatch))

    # ---- tables
    print(f"\n### Grid search over a scalar delta ({len(grid)} plain runs)\n")
    print("| delta | val acc | val NLL | test acc | test NLL | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in grid:
        mark = " **(selected)**" if r is best else ""
        print(
            f"| {r['delta']:.4g}{mark} | {fmt(r['val']['acc'])} | {fmt(r['val']['nll'])} | "
            f"{fmt(r['test']['acc'])} | {fmt(r['test']['nll'])} | {r['seconds']:.1f} |"
        )

    print("\n### Test set: grid winner versus online marglik\n")
    print("| method | predictive | test acc | test NLL | log evidence (exact Laplace) | time (s) | time / plain run |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(
        f"| grid (delta = {best['delta']:.4g}) | MAP plug-in | {fmt(best['test']['acc'])} | "
        f"{fmt(best['test']['nll'])} | - | {sum(r['seconds'] for r in grid):.1f} (all {len(grid)}) | "
        f"{sum(r['seconds'] for r in grid) / plain_seconds:.2f} |"
    )
    if grid_gp is not None:
        print(
            f"| grid (delta = {best['delta']:.4g}) | LinearizedGP probit | {fmt(grid_gp['acc'])} | "
            f"{fmt(grid_gp['nll'])} | {grid_gp['log_evidence']:.1f} | - | - |"
        )
    for o in onlines:
        print(
            f"| {o['name']} | MAP plug-in | {fmt(o['map']['test']['acc'])} | {fmt(o['map']['test']['nll'])} | - | "
            f"{o['seconds']:.1f} (marglik {o['marglik_seconds']:.1f}) | {o['seconds'] / plain_seconds:.2f} |"
        )
        if "gp" in o:
            print(
                f"| {o['name']} | LinearizedGP probit | {fmt(o['gp']['acc'])} | {fmt(o['gp']['nll'])} | "
                f"{o['gp']['log_evidence']:.1f} | - | - |"
            )
    print(
        f"\nOne plain run (median of the grid's {len(grid)}): {plain_seconds:.1f} s; fit_online_marglik's loop "
        f"with no marglik step: {library_loop_seconds:.1f} s."
    )
    names = [n for n, _ in net0.named_parameters()]
    print("\n### Learned per-tensor prior precisions (online) and the grid's scalar\n")
    print("| tensor | " + " | ".join(o["name"] for o in onlines) + " | grid |")
    print("|---|" + "---:|" * (len(onlines) + 1))
    for i, name in enumerate(names):
        print(
            f"| {name} | " + " | ".join(f"{o['prior_precision'][i]:.4g}" for o in onlines) + f" | {best['delta']:.4g} |"
        )
    for o in onlines:
        ratio = o["seconds"] / plain_seconds
        met_time = ratio <= 2.0
        met_acc = o["map"]["test"]["acc"] >= best["test"]["acc"]
        met_nll = o["map"]["test"]["nll"] <= best["test"]["nll"]
        print(
            f"\nTargets, {o['name']}: time <= 2x plain: {'met' if met_time else 'MISSED'} ({ratio:.2f}x); "
            f"MAP test acc >= grid: {'met' if met_acc else 'MISSED'}; "
            f"MAP test NLL <= grid: {'met' if met_nll else 'MISSED'}"
            + (
                f"; GP test NLL <= grid MAP: {'met' if o['gp']['nll'] <= best['test']['nll'] else 'MISSED'}"
                if "gp" in o
                else ""
            )
        )
    total = time.perf_counter() - start
    print(
        f"\nTotal benchmark time {total:.0f} s; load average before {machine['load_average_1_5_15']}, "
        f"after {list(os.getloadavg())}."
    )

    report = {
        **run_record(machine, args),
        "num_parameters": num_params,
        "parameter_names": names,
        "data_sizes": {"train": len(data.y_train), "val": len(data.y_val), "test": len(data.y_test)},
        "grid": grid,
        "grid_selected_delta": best["delta"],
        "grid_gp": grid_gp,
        "plain_run_seconds_median": plain_seconds,
        "library_loop_seconds": library_loop_seconds,
        "online": onlines,
        "total_seconds": total,
        "command": command_line(),
    }
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
