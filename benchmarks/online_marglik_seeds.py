r"""Benchmark (issue 6): online marglik versus a validation-selected weight-decay grid, over seeds.

One split of 360 test points decides accuracy by single images (1/360 = 0.0028), so this script
repeats the comparison of ``online_marglik_digits.py`` over several seeds. A seed sets the
stratified split, the initialization and the shuffling. Per seed:

* **grid**: plain runs (``train_plain`` of ``online_marglik_digits.py``), one per scalar
  :math:`\delta` of the 8-value grid (0.01 to 1000), trained on the 1077 training points; the
  value with the lowest validation NLL is selected. Time: all 8 runs.
* **grid, refit**: the selected :math:`\delta` trained once more on training plus validation
  points (1437). Time: the 8 runs plus the refit. A common extra step, reported for fairness.
* **online marglik** (``fit_online_marglik``, minibatch tuner, subset size 50, per-tensor
  :math:`\delta` from 1, SoftmaxLikelihood), once on the training points only and once on
  training plus validation points: it selects its hyperparameters by the evidence, so it needs
  no validation split, and the points the grid holds out are training data for it.
  Configurations (``--configs``, ``every/steps/hyper_lr``): ``10/3/0.3`` (the cheapest) and
  ``5/10/0.1`` (the library's defaults).

Reported: mean and standard deviation over seeds of test accuracy and test NLL (the MAP
network's softmax), per-seed values, and median wall times; the time ratios use one plain run
on the same points (the grid's median run for 1077 points, the refit run for 1437).

Usage::

    flock /tmp/ntkgp-bench.lock .venv/bin/python benchmarks/online_marglik_seeds.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ntkgp  # noqa: E402
from benchmarks import online_marglik_digits as digits  # noqa: E402
from benchmarks.harness import args_record, machine_summary, write_json  # noqa: E402
from ntkgp.likelihoods import SoftmaxLikelihood  # noqa: E402
from ntkgp.marglik import fit_online_marglik  # noqa: E402


def with_validation(data: digits.Split) -> digits.Split:
    """Training plus validation points as the training set (the test set unchanged)."""
    return digits.Split(
        torch.cat([data.x_train, data.x_val]),
        torch.cat([data.y_train, data.y_val]),
        data.x_val,
        data.y_val,
        data.x_test,
        data.y_test,
    )


def to_device(data: digits.Split, device: torch.device) -> digits.Split:
    return digits.Split(*(t.to(device) for t in vars(data).values()))


def log_evidence(net: torch.nn.Module, data: digits.Split, prior_precision: Tensor | float) -> float:
    """The exact Laplace log evidence of ``net`` (at its weights) on its training points."""
    model = ntkgp.LinearizedGP(
        net.eval(),
        SoftmaxLikelihood(num_classes=digits.NUM_CLASSES),
        data.x_train,
        data.y_train,
        prior_precision=torch.as_tensor(prior_precision).clone(),
    )
    with torch.no_grad():
        return float(model.log_evidence())


def online(
    seed: int,
    data: digits.Split,
    every: int,
    steps: int,
    hyper_lr: float,
    epochs: int,
    subset_size: int | None,
    evidence: bool,
    scalar_prior: bool,
) -> dict[str, Any]:
    net = digits.make_net(100, 2, "tanh", seed).to(data.x_train.device)
    prior = 1.0 if scalar_prior else torch.ones(len(list(net.parameters())))
    result = fit_online_marglik(
        net,
        SoftmaxLikelihood(num_classes=digits.NUM_CLASSES),
        data.x_train,
        data.y_train,
        prior_precision=prior,
        epochs=epochs,
        batch_size=128,
        lr=1e-3,
        progress=False,
        generator=torch.Generator().manual_seed(seed),
        marglik_every=every,
        burnin=10,
        steps=steps,
        hyper_lr=hyper_lr,
        subset_size=subset_size,
        minibatch=subset_size is not None,
    )
    out = {
        **digits.map_metrics(net.eval(), data.x_test, data.y_test),
        "seconds": result.seconds,
        "prior_precision": result.prior_precision.tolist(),
    }
    if evidence:
        out["log_evidence"] = log_evidence(net, data, result.prior_precision)
    return out


def one_seed(
    seed: int,
    configs: list[tuple[int, int, float]],
    epochs: int,
    subset_size: int | None,
    device: torch.device,
    evidence: bool,
    splits: list[str],
    scalar_prior: bool,
) -> dict[str, dict[str, Any]]:
    data = to_device(digits.load_data(seed), device)
    full = with_validation(data)
    args = argparse.Namespace(width=100, depth=2, activation="tanh", seed=seed, epochs=epochs, batch_size=128, lr=1e-3)
    runs = []
    for delta in (float(v) for v in np.logspace(-2, 3, 8)):
        net, seconds, _ = digits.train_plain(args, data, delta)
        val_nll = digits.map_metrics(net, data.x_val, data.y_val)["nll"]
        runs.append(
            {
                "delta": delta,
                "seconds": seconds,
                "val_nll": val_nll,
                **digits.map_metrics(net, data.x_test, data.y_test),
            }
        )
        if evidence:
            runs[-1]["log_evidence"] = log_evidence(net, data, delta)
    best = min(runs, key=lambda r: r["val_nll"])
    grid_seconds = sum(r["seconds"] for r in runs)
    net, refit_seconds, _ = digits.train_plain(args, full, best["delta"])
    out = {
        "grid (train, selected on val)": {**best, "seconds": grid_seconds},
        "grid, refit on train+val": {
            **digits.map_metrics(net, data.x_test, data.y_test),
            "delta": best["delta"],
            "seconds": grid_seconds + refit_seconds,
        },
        "_plain": {"train": statistics.median(r["seconds"] for r in runs), "train+val": refit_seconds},
    }
    for every, steps, lr in configs:
        for name, split in (("train", data), ("train+val", full)):
            if name not in splits:
                continue
            out[f"online {every}/{steps}/{lr:g} on {name}"] = online(
                seed, split, every, steps, lr, epochs, subset_size, evidence, scalar_prior
            )
    if evidence:
        out["_grid"] = runs
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--configs", nargs="+", default=["10/3/0.3", "5/10/0.1"], help="every/steps/hyper_lr")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--subset-size",
        type=int,
        default=50,
        help="the online tuner's subset size, with minibatch=True (0: the exact evidence)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--scalar-prior",
        action="store_true",
        help="online marglik with one prior precision for all weights (default: one per tensor)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=["train", "train+val"],
        default=["train", "train+val"],
        help="the training sets of the online runs",
    )
    parser.add_argument(
        "--evidence", action="store_true", help="also report the exact log evidence of every trained network"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    configs = [(int(e), int(s), float(lr)) for e, s, lr in (c.split("/") for c in args.configs)]
    load_before = list(os.getloadavg())
    per_seed = []
    for seed in args.seeds:
        per_seed.append(
            one_seed(
                seed,
                configs,
                args.epochs,
                args.subset_size or None,
                torch.device(args.device),
                args.evidence,
                args.splits,
                args.scalar_prior,
            )
        )
        print(
            f"seed {seed}: "
            + "; ".join(
                f"{k}: acc {v['acc']:.4f} NLL {v['nll']:.4f}"
                + (f" log ev {v['log_evidence']:.1f}" if "log_evidence" in v else "")
                + (f" delta {v['delta']:.3g}" if "delta" in v else "")
                for k, v in per_seed[-1].items()
                if not k.startswith("_")
            ),
            flush=True,
        )
        if args.json is not None:  # after every seed, so that a cut-off run leaves its seeds
            write_json({"args": args_record(args), "per_seed": per_seed}, args.json, announce=False)
    plain = {k: statistics.median(s["_plain"][k] for s in per_seed) for k in ("train", "train+val")}
    print(
        f"\nOne plain run, median over seeds: {plain['train']:.2f} s on 1077 points, "
        f"{plain['train+val']:.2f} s on 1437.\n"
    )
    print(
        "| method | test acc (mean ± sd) | test NLL (mean ± sd) | median time (s) "
        "| time / plain run on the same points | per-seed acc | per-seed NLL |"
    )
    print("|---|---:|---:|---:|---:|---|---|")
    for name in (k for k in per_seed[0] if not k.startswith("_")):
        acc = np.array([s[name]["acc"] for s in per_seed])
        nll = np.array([s[name]["nll"] for s in per_seed])
        seconds = statistics.median(s[name]["seconds"] for s in per_seed)
        base = plain["train+val" if name.endswith("train+val") else "train"]
        ratio = "—" if name.startswith("grid") else f"{seconds / base:.2f}"
        print(
            f"| {name} | {acc.mean():.4f} ± {acc.std():.4f} | {nll.mean():.4f} ± {nll.std():.4f} | {seconds:.2f} "
            f"| {ratio} | {' '.join(f'{a:.4f}' for a in acc)} | {' '.join(f'{v:.4f}' for v in nll)} |"
        )
    if "_grid" in per_seed[0]:
        print("\nExact log evidence of every trained network (at its prior precision), per seed:\n")
        print("| seed | network | delta | val NLL | test acc | test NLL | log evidence |")
        print("|---:|---|---|---:|---:|---:|---:|")
        for seed, s in zip(args.seeds, per_seed):
            for r in s["_grid"]:
                print(
                    f"| {seed} | grid | {r['delta']:.3g} | {r['val_nll']:.4f} | {r['acc']:.4f} | {r['nll']:.4f} "
                    f"| {r['log_evidence']:.1f} |"
                )
            for name in (k for k in s if k.startswith("online") and k.endswith("on train")):
                r = s[name]
                delta = " ".join(f"{d:.3g}" for d in r["prior_precision"])
                print(f"| {seed} | {name} | {delta} | - | {r['acc']:.4f} | {r['nll']:.4f} | {r['log_evidence']:.1f} |")
    print(f"\nLoad average before {load_before}, after {list(os.getloadavg())}.")
    if args.json is not None:
        write_json(
            {"args": args_record(args), "per_seed": per_seed, "plain": plain, "machine": machine_summary(1)},
            args.json,
            announce=False,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
