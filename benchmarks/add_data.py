r"""Benchmark (issue 17): adding 10 points to a LinearizedGP of N = 2000 without a rebuild.

For an MLP 6-64-64-1 (P = 4673 > N: kernel space) and 6-24-24-1 (P = 793 < N: weight space), on
2010 uniform points of the unit cube with ``sin(sum x)`` targets: the median seconds of

* **rebuild**: ``LinearizedGP`` on all 2010 points, its posterior and a prediction at 5 points;
* **update**: ``add_data`` of the last 10 points to the GP of the first 2000 (posterior already
  computed), then its posterior and the same prediction;

and the largest difference of the two models' predictive means and covariances.
``--threads 1`` by default (see ``benchmarks/bayesopt.py`` on the shared machine).

Usage::

    .venv/bin/python benchmarks/add_data.py --repeats 5
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
        rebuild, update, err = [], [], 0.0
        for _ in range(args.repeats + 1):  # the first pair warms up
            start = time.perf_counter()
            ref = ntkgp.LinearizedGP(net, lik(), x, y, solver=solver).eval()
            ref.posterior()
            with torch.no_grad():
                a = ref(x_test)
                a_mean, a_cov = a.mean, a.covariance_matrix
            rebuild.append(time.perf_counter() - start)
            model = ntkgp.LinearizedGP(net, lik(), x[:2000], y[:2000], solver=solver).eval()
            model.posterior()
            start = time.perf_counter()
            model.add_data(x[2000:], y[2000:])
            model.posterior()
            with torch.no_grad():
                b = model(x_test)
                b_mean, b_cov = b.mean, b.covariance_matrix
            update.append(time.perf_counter() - start)
            err = max(err, float((a_mean - b_mean).abs().max()), float((a_cov - b_cov).abs().max()))
        r, u = statistics.median(rebuild[1:]), statistics.median(update[1:])
        P = sum(p.numel() for p in net.parameters())
        print(f"{solver:6s} P={P}: rebuild {r:.3f} s, update {u:.3f} s, speed-up {r / u:.1f}x, max diff {err:.1e}")
        report[solver] = {"P": P, "rebuild": rebuild[1:], "update": update[1:], "speedup": r / u, "max_diff": err}
    finish_report(report, started, args.json)


if __name__ == "__main__":
    main()
