r"""Benchmark (issue 17): adding 10 points to a LinearizedGP of N = 2000 without a rebuild.

For an MLP 6-64-64-1 (P = 4673 > N: kernel space) and 6-24-24-1 (P = 793 < N: weight space), on
2010 uniform points of the unit cube with ``sin(sum x)`` targets: the median seconds of

* **rebuild**: ``LinearizedGP`` on all 2010 points and its posterior ("conditioning"), then a
  prediction at 5 points (mean and covariance; "with prediction" is the sum);
* **update**: ``add_data`` of the last 10 points to the GP of the first 2000 (posterior already
  computed) and its posterior ("conditioning"), then the same prediction;

and the largest difference of the two models' predictive means and covariances.
``--threads 1`` by default (see ``benchmarks/bayesopt.py`` on the shared machine).

Usage::

    .venv/bin/python benchmarks/add_data.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpytorch  # noqa: E402

import ntkgp  # noqa: E402
from benchmarks.harness import finish_report, start_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    report, started = start_report(args)
    torch.manual_seed(0)
    x = torch.rand(2010, 6, dtype=torch.float64)
    y = torch.sin(x.sum(1))
    x_test = torch.rand(5, 6, dtype=torch.float64)

    def lik() -> gpytorch.likelihoods.GaussianLikelihood:
        out = gpytorch.likelihoods.GaussianLikelihood().double()
        out.noise = 0.01
        return out

    for width, solver in ((64, "kernel"), (24, "weight")):
        layers = [nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)]
        net = nn.Sequential(*layers).double().eval()
        runs: dict[str, list[float]] = {k: [] for k in ("rebuild", "rebuild_total", "update", "update_total")}
        err = 0.0
        for _ in range(args.repeats + 1):  # the first pair warms up
            start = time.perf_counter()
            ref = ntkgp.LinearizedGP(net, lik(), x, y, solver=solver).eval()
            ref.posterior()
            conditioned = time.perf_counter()
            with torch.no_grad():
                a = ref(x_test)
                a_mean, a_cov = a.mean, a.covariance_matrix
            end = time.perf_counter()
            runs["rebuild"].append(conditioned - start)
            runs["rebuild_total"].append(end - start)
            model = ntkgp.LinearizedGP(net, lik(), x[:2000], y[:2000], solver=solver).eval()
            model.posterior()
            start = time.perf_counter()
            model.add_data(x[2000:], y[2000:])
            model.posterior()
            conditioned = time.perf_counter()
            with torch.no_grad():
                b = model(x_test)
                b_mean, b_cov = b.mean, b.covariance_matrix
            end = time.perf_counter()
            runs["update"].append(conditioned - start)
            runs["update_total"].append(end - start)
            err = max(err, float((a_mean - b_mean).abs().max()), float((a_cov - b_cov).abs().max()))
        med = {k: statistics.median(v[1:]) for k, v in runs.items()}
        P = sum(p.numel() for p in net.parameters())
        for label, r, u in (
            ("conditioning", med["rebuild"], med["update"]),
            ("with prediction", med["rebuild_total"], med["update_total"]),
        ):
            print(f"{solver:6s} P={P} {label:15s}: rebuild {r:.4f} s, update {u:.4f} s, speed-up {r / u:.1f}x")
        print(f"{solver:6s} max diff of mean and covariance to the rebuild: {err:.1e}")
        report[solver] = {
            "P": P,
            **{k: v[1:] for k, v in runs.items()},
            "medians": med,
            "speedup_conditioning": med["rebuild"] / med["update"],
            "speedup_with_prediction": med["rebuild_total"] / med["update_total"],
            "max_diff": err,
        }
    finish_report(report, started, args.json)


if __name__ == "__main__":
    main()
