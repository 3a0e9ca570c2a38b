r"""Benchmark (issue 5): the inducing-point Laplace GP against the exact one, digits classification.

Setup: scikit-learn's ``load_digits`` (1797 images, 64 pixels, 10 classes), a stratified split
into ``--n-train`` (default 1500) training and the remaining test images (seeded), pixels
standardized with the training mean and standard deviation (floored at 1 pixel unit, as
``examples/digits_classification.py``). A 64-128-128-10 tanh MLP in float64 (P = 26,122) is
trained to a MAP with ``ntkgp.marglik.train_map`` (cross-entropy + weight decay δ; Adam then
L-BFGS). The same trained network becomes ``ntkgp.LinearizedGP`` with
``SoftmaxLikelihood(num_classes=10)`` (probit approximation of the predictive) and the same
prior precision δ (default 1, the training weight decay; fixed, not fitted) in two ways:

* ``exact``: ``solver="kernel"``: the Laplace GP on all N·C = 15,000 latent values (dense
  Cholesky, float64);
* ``inducing``: ``ntkgp.solvers.Inducing(num_inducing=M)`` (default M = 300, pivoted-Cholesky
  selection), the inducing Laplace GP (its evidence is a lower bound on the Laplace evidence).

Each: build + log evidence + class probabilities ``lik(model(x)).probs`` on the test images (25
at a time). Reported: test NLL, ECE (15 equal-width confidence bins), accuracy, their relative
differences inducing vs exact, the log evidence, wall time (median over ``--repeats`` for the
inducing route; the exact route runs ``--exact-repeats`` times) and the peak RSS added
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, in this process; the runs
alternate in one process).

Usage::

    .venv/bin/python benchmarks/approximate_digits.py --json digits_approx.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ntkgp  # noqa: E402
from benchmarks.harness import MiB, PeakRSS, PhaseTimer, finish_report, start_report  # noqa: E402

NUM_CLASSES = 10
ECE_BINS = 15


def load(n_train: int, seed: int) -> dict[str, Tensor]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, train_size=n_train, random_state=seed, stratify=y)
    mean, sd = x_tr.mean(0), np.maximum(x_tr.std(0), 1.0)

    def f64(a: np.ndarray) -> Tensor:
        return torch.as_tensor((a - mean) / sd, dtype=torch.float64)

    return {"x": f64(x_tr), "y": torch.as_tensor(y_tr), "x_test": f64(x_te), "y_test": torch.as_tensor(y_te)}


def make_net(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, NUM_CLASSES)
    ).double()


def nll(probs: Tensor, y: Tensor) -> float:
    return float(-probs.gather(1, y.unsqueeze(1)).clamp_min(1e-300).log().mean())


def ece(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> float:
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    idx = torch.clamp((conf * bins).long(), max=bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    acc = torch.bincount(idx, weights=correct, minlength=bins) / count.clamp_min(1)
    mean_conf = torch.bincount(idx, weights=conf.double(), minlength=bins) / count.clamp_min(1)
    return float((count / len(y) * (acc - mean_conf).abs()).sum())


def workflow(net: nn.Module, data: dict[str, Tensor], delta: float, solver: Any, chunk: int = 25) -> dict:
    timer = PhaseTimer()
    lik = ntkgp.likelihoods.SoftmaxLikelihood(num_classes=NUM_CLASSES)
    model = ntkgp.LinearizedGP(net, lik, data["x"], data["y"], prior_precision=delta, solver=solver)
    _ = model.solver
    timer.mark("build")
    with torch.no_grad():
        lml = float(model.log_evidence())
    timer.mark("lml")
    model.eval()
    lik.eval()
    with torch.no_grad():
        probs = torch.cat(
            [lik(model(data["x_test"][i : i + chunk])).probs for i in range(0, len(data["x_test"]), chunk)]
        )
    times = timer.stop("predict")
    return {"time": times, "lml": lml, "probs": probs.detach().double(), "solver": model.solver.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--num-inducing", type=int, default=300)
    parser.add_argument("--selection", default="pivoted_cholesky")
    parser.add_argument("--prior-precision", type=float, default=1.0, help="δ: training weight decay and GP prior")
    parser.add_argument("--repeats", type=int, default=3, help="inducing runs (median)")
    parser.add_argument("--exact-repeats", type=int, default=1, help="exact runs (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report, started = start_report(args)

    data = load(args.n_train, args.seed)
    torch.manual_seed(args.seed)
    net = make_net(args.width)
    t0 = time.perf_counter()
    grad = ntkgp.marglik.train_map(
        net,
        ntkgp.likelihoods.SoftmaxLikelihood(num_classes=NUM_CLASSES),
        data["x"],
        data["y"],
        args.prior_precision,
        adam_steps=800,
        lbfgs_steps=300,
    )
    net.eval()
    with torch.no_grad():
        map_probs = torch.softmax(net(data["x_test"]), -1)
    p = sum(q.numel() for q in net.parameters())
    print(
        f"digits: {len(data['y'])} train / {len(data['y_test'])} test, MLP 64-{args.width}-{args.width}-10, P = {p}; "
        f"MAP |grad| {grad:.1e} in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    # warm-up, untimed: both routes on 40 points (first-call costs out of the clock)
    small = {"x": data["x"][:40], "y": data["y"][:40], "x_test": data["x_test"][:5], "y_test": data["y_test"][:5]}
    workflow(net, small, args.prior_precision, "kernel")
    workflow(net, small, args.prior_precision, ntkgp.solvers.Inducing(num_inducing=8, selection=args.selection))

    def spec(kind: str) -> Any:
        if kind == "exact":
            return "kernel"
        return ntkgp.solvers.Inducing(
            num_inducing=args.num_inducing, selection=args.selection, generator=torch.Generator().manual_seed(args.seed)
        )

    runs: dict[str, list[dict]] = {"exact": [], "inducing": []}
    for rep in range(max(args.repeats, args.exact_repeats)):
        for kind in ("exact", "inducing"):
            if len(runs[kind]) >= (args.exact_repeats if kind == "exact" else args.repeats):
                continue
            with PeakRSS() as probe:
                out = workflow(net, data, args.prior_precision, spec(kind))
            out["peak_rss_bytes"] = probe.peak_delta
            runs[kind].append(out)
            t = out["time"]
            print(
                f"  {kind:>8} rep {rep + 1}: {t['total']:.2f} s (build {t['build']:.2f}, lml {t['lml']:.2f}, "
                f"predict {t['predict']:.2f}), peak RSS +{probe.peak_delta / MiB:.0f} MiB, lml {out['lml']:.2f}",
                flush=True,
            )

    rows = {}
    for kind, rs in runs.items():
        probs = rs[0]["probs"]
        rows[kind] = {
            "time_median": statistics.median(r["time"]["total"] for r in rs),
            "repeats": len(rs),
            "phase_median": {k: statistics.median(r["time"][k] for r in rs) for k in rs[0]["time"]},
            "peak_rss_median": statistics.median(r["peak_rss_bytes"] for r in rs),
            "lml": rs[0]["lml"],
            "nll": nll(probs, data["y_test"]),
            "ece": ece(probs, data["y_test"]),
            "acc": float((probs.argmax(1) == data["y_test"]).double().mean()),
            "solver": rs[0]["solver"],
        }
    rows["map"] = {
        "nll": nll(map_probs, data["y_test"]),
        "ece": ece(map_probs, data["y_test"]),
        "acc": float((map_probs.argmax(1) == data["y_test"]).double().mean()),
    }
    pe, pi = runs["exact"][0]["probs"], runs["inducing"][0]["probs"]
    ex, ind = rows["exact"], rows["inducing"]
    report["comparison"] = {
        "nll_rel_diff": (ind["nll"] - ex["nll"]) / ex["nll"],
        "ece_rel_diff": (ind["ece"] - ex["ece"]) / ex["ece"],
        "ece_abs_diff": ind["ece"] - ex["ece"],
        "max_abs_prob_diff": float((pi - pe).abs().max()),
        "lml_diff": ind["lml"] - ex["lml"],
    }
    report["rows"] = rows
    lines = [
        "| method | time (s) | repeats | peak RSS (MiB) | log evidence | test NLL | ECE (15 bins) | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in (
        (f"exact (kernel, N·C = {len(data['y']) * NUM_CLASSES})", ex),
        (f"inducing M = {args.num_inducing} ({args.selection})", ind),
    ):
        lines.append(
            f"| {name} | {r['time_median']:.2f} | {r['repeats']} | {r['peak_rss_median'] / MiB:.0f} "
            f"| {r['lml']:.2f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['acc']:.4f} |"
        )
    m = rows["map"]
    lines.append(
        f"| MAP plug-in softmax (context) | — | — | — | — | {m['nll']:.4f} | {m['ece']:.4f} | {m['acc']:.4f} |"
    )
    report["table"] = "\n".join(lines)
    c = report["comparison"]
    print("\n" + report["table"])
    print(
        f"\ninducing vs exact: NLL {c['nll_rel_diff']:+.2%}, ECE {c['ece_rel_diff']:+.2%} "
        f"({c['ece_abs_diff']:+.4f} absolute), max |Δp| {c['max_abs_prob_diff']:.2e}, "
        f"log evidence {c['lml_diff']:+.2f}"
    )
    finish_report(report, started, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
