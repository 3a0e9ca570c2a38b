r"""Beyond exact: inducing points (SGPR and subset of regressors) and subset of data, against exact.

What it shows
-------------
1-D regression, :math:`y = \sin(2x) + 0.15\,\varepsilon`, with ``N`` inputs (default 5000) drawn
uniformly from :math:`[-3, 3]` except a gap, :math:`(0.5, 1.5)`. A tanh MLP (1-64-64-1, float64,
P = 4353) is trained to a MAP of the squared error plus weight decay. The trained network then
becomes a GP four ways, all with the same prior precision :math:`\delta` and noise
:math:`\sigma^2`:

* **exact**: ``LinearizedGP(..., solver="auto")``, the reference;
* **SGPR**: ``solver=Inducing(num_inducing=M)``, Titsias' collapsed bound and its predictive,
  which keeps the prior variance :math:`K_{**} - Q_{**}` outside the span of the ``M``
  inducing Jacobians;
* **subset of regressors**: ``Inducing(num_inducing=M, prior_residual=False)``, the same
  inducing points without that term (laplace-torch's ELLA for one output);
* **subset of data**: ``SubsetOfData(num_points=M)``, the exact GP of ``M`` random points
  with the prior variance scaled by ``M/N`` (laplace-torch's FunctionalLaplace convention).

:math:`\delta` and :math:`\sigma^2` are fitted once, by Adam on the SGPR's collapsed bound with
``M`` inducing points: its cost after one pass over the data does not depend on ``N``. The
three approximations use the network's own output as the predictive mean (``mean="network"``),
so the figure compares their variances.

How to read the figure
----------------------
One panel per route: data (grey dots, a subsample), the predictive mean and the band
:math:`\pm 2` standard deviations of :math:`f` (shaded) and of :math:`y` (dotted), and the
inducing or subset points (ticks at the bottom). The exact panel's mean is the linearized
posterior mean; the others use the network's output, so outside the data the means differ.
The last panel plots the four epistemic standard deviations against :math:`x` on a log scale.
With the defaults (``N = 5000``, ``M = 30``) it shows:

* **SGPR** follows the exact standard deviation inside the data and beyond it, and is a little
  wider in the gap: the inducing Jacobians span what the data constrain, and the prior
  residual keeps the rest.
* **subset of regressors** follows it inside the data but is too narrow in the gap and beyond
  (3-6x at the edges of the plot): it has no variance outside the span of the 30 inducing Jacobians.
* **subset of data** is about 6x too wide inside the data (30 points, each standing for
  ``N/M`` of them with ``N/M`` times the noise, constrain the function less than 5000 do) and
  too narrow beyond it.

The printed table gives each route's time (build and predictive at 1400 inputs), its test NLL
of :math:`y` on 1000 held-out points, and its variance error against exact (largest absolute
error over the largest exact variance; median ratio). The held-out NLL hardly separates the
routes here: the noise dominates the predictive variance inside the data.

Run: ``.venv/bin/python examples/approximate_posteriors.py [--out approximate_posteriors.png]
[--n 5000] [--m 30] [--seed 0]`` (about 30 s on two CPU cores).
``--smoke`` shrinks data, network and steps (:data:`SMOKE`) for a seconds-long test run through the same code.
"""

from __future__ import annotations

import argparse
import math
import time

import gpytorch
import matplotlib
import numpy as np
import torch
from torch import Tensor, nn

import ntkgp
from ntkgp.solvers import Inducing, SubsetOfData

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

X_RANGE = (-3.0, 3.0)
GAP = (0.5, 1.5)
NOISE_SD = 0.15
#: ``--smoke``: option values of a seconds-long run through the same code (the test suite runs it)
SMOKE = {"n": 200, "m": 10, "width": 8, "steps": 20, "bound_steps": 5}


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points of :math:`\\sin(2x) + 0.15\\varepsilon` on :math:`[-3, 3]` minus the gap, float64."""
    x = torch.empty(0, dtype=torch.float64)
    while x.numel() < n:
        draw = torch.rand(2 * n, generator=generator, dtype=torch.float64) * (X_RANGE[1] - X_RANGE[0]) + X_RANGE[0]
        x = torch.cat([x, draw[(draw < GAP[0]) | (draw > GAP[1])]])
    x = x[:n, None]
    y = torch.sin(2 * x[:, 0]) + NOISE_SD * torch.randn(n, generator=generator, dtype=torch.float64)
    return x, y


def train(x: Tensor, y: Tensor, delta: float, steps: int, seed: int, width: int = 64) -> nn.Module:
    """Full-batch Adam on the squared error over the true noise variance plus weight decay ``delta``."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        fit = 0.5 * (net(x)[:, 0] - y).square().sum() / NOISE_SD**2
        prior = 0.5 * delta * sum(p.square().sum() for p in net.parameters())
        (fit + prior).backward()
        opt.step()
        sched.step()
    return net.eval()


def gaussian(noise: float) -> gpytorch.likelihoods.GaussianLikelihood:
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = noise
    return likelihood


def fit_on_the_bound(
    net: nn.Module, x: Tensor, y: Tensor, m: int, seed: int, steps: int = 60
) -> tuple[float, float, float]:
    """δ and σ² by ``steps`` Adam steps on the SGPR collapsed bound; returns them and the seconds taken."""
    start = time.perf_counter()
    likelihood = gaussian(NOISE_SD**2)
    model = ntkgp.LinearizedGP(
        net,
        likelihood,
        x,
        y,
        prior_precision=1.0,
        solver=Inducing(num_inducing=m, generator=torch.Generator().manual_seed(seed)),
    )
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        (-model.log_evidence()).backward()
        optimizer.step()
    delta = float(model.prior_precision.detach()[0])
    return delta, float(likelihood.noise.detach()), time.perf_counter() - start


def predict(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    delta: float,
    noise: float,
    solver,
    x_test: Tensor,
) -> tuple[Tensor, Tensor, float, ntkgp.LinearizedGP]:
    """Latent mean and variance at ``x_test`` and the seconds for build + predictive."""
    start = time.perf_counter()
    model = ntkgp.LinearizedGP(net, gaussian(noise), x, y, prior_precision=delta, solver=solver)
    model.eval()
    with torch.no_grad():
        latent = model(x_test)
        mean, var = latent.mean.clone(), latent.variance.clone()
    return mean, var, time.perf_counter() - start, model


def nll(mean: Tensor, var: Tensor, noise: float, y: Tensor) -> float:
    total = var + noise
    return float((0.5 * (y - mean).square() / total + 0.5 * torch.log(2 * math.pi * total)).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="approximate_posteriors.png", help="path of the figure")
    parser.add_argument("--n", type=int, default=5000, help="training points")
    parser.add_argument("--m", type=int, default=30, help="inducing / subset points")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps of the MAP fit")
    parser.add_argument("--width", type=int, default=64, help="hidden units per layer")
    parser.add_argument("--bound-steps", type=int, default=60, help="Adam steps on the SGPR bound for δ and σ²")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE) for a seconds-long test run")
    args = parser.parse_args(argv)
    if args.smoke:  # the SMOKE values replace the defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    x, y = make_data(args.n, generator)
    x_held, y_held = make_data(1000, generator)
    x_plot = torch.linspace(-4.5, 4.5, 400, dtype=torch.float64)[:, None]

    t0 = time.perf_counter()
    net = train(x, y, 1.0, args.steps, args.seed, args.width)
    with torch.no_grad():
        rmse = float((net(x)[:, 0] - y).square().mean().sqrt())
    print(f"MAP fit: {time.perf_counter() - t0:.1f} s, train RMSE {rmse:.4f}")
    delta, noise, seconds = fit_on_the_bound(net, x, y, args.m, args.seed, args.bound_steps)
    print(
        f"fitted on the SGPR bound (M = {args.m}, {args.bound_steps} Adam steps, {seconds:.1f} s): "
        f"delta = {delta:.3g}, sigma^2 = {noise:.4g} (true {NOISE_SD**2:.4g})"
    )

    def inducing(residual: bool) -> Inducing:
        return Inducing(
            num_inducing=args.m,
            mean="network",
            prior_residual=residual,
            generator=torch.Generator().manual_seed(args.seed),
        )

    routes = {
        "exact": "auto",
        f"SGPR, M = {args.m}": inducing(True),
        f"subset of regressors, M = {args.m}": inducing(False),
        f"subset of data, M = {args.m}": SubsetOfData(
            num_points=args.m, mean="network", generator=torch.Generator().manual_seed(args.seed)
        ),
    }
    results = {}
    for name, solver in routes.items():
        mean, var, seconds, model = predict(net, x, y, delta, noise, solver, torch.cat([x_plot, x_held]))
        points = getattr(model.solver, "indices", None)
        results[name] = {
            "mean": mean[: len(x_plot)],
            "var": var[: len(x_plot)],
            "seconds": seconds,
            "nll": nll(mean[len(x_plot) :], var[len(x_plot) :], noise, y_held),
            "held_var": var[len(x_plot) :],
            "points": None if points is None else x[points.cpu(), 0],
        }
    exact = results["exact"]
    print("\n| route | time (s) | held-out NLL | max var err vs exact | median var / exact |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        err = float((r["held_var"] - exact["held_var"]).abs().max() / exact["held_var"].max())
        ratio = float((r["held_var"] / exact["held_var"]).median())
        print(f"| {name} | {r['seconds']:.2f} | {r['nll']:.4f} | {err:.3g} | {ratio:.3g} |")
    plot(args.out, x, y, x_plot, results, noise)
    print(f"\nwrote {args.out}")


def plot(path: str, x: Tensor, y: Tensor, x_plot: Tensor, results: dict, noise: float) -> None:
    grid = x_plot[:, 0].numpy()
    fig, axes = plt.subplots(5, 1, figsize=(8, 15), sharex=True)
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:600]
    colors = ["k", "tab:blue", "tab:orange", "tab:green"]
    for ax, (name, r), color in zip(axes[:4], results.items(), colors, strict=True):
        mean, sd = r["mean"].numpy(), r["var"].sqrt().numpy()
        ax.scatter(x[keep, 0], y[keep], s=3, color="0.7", zorder=1)
        ax.plot(grid, mean, color=color, lw=1.5)
        ax.fill_between(grid, mean - 2 * sd, mean + 2 * sd, color=color, alpha=0.25, label="f: ±2 sd")
        total = np.sqrt(sd**2 + noise)
        ax.plot(grid, mean - 2 * total, ":", color=color, lw=1)
        ax.plot(grid, mean + 2 * total, ":", color=color, lw=1, label="y: ±2 sd")
        if r["points"] is not None:
            ax.plot(r["points"], np.full(len(r["points"]), -2.4), "|", color=color, ms=10, label="its M points")
        ax.axvspan(*GAP, color="0.9", zorder=0)
        ax.set_ylim(-2.5, 2.5)
        ax.set_title(f"{name}: {r['seconds']:.2f} s, held-out NLL {r['nll']:.3f}")
        ax.legend(loc="upper left", fontsize=7)
    ax = axes[4]
    for (name, r), color in zip(results.items(), colors, strict=True):
        ax.semilogy(grid, r["var"].sqrt().numpy(), color=color, label=name)
    ax.axvspan(*GAP, color="0.9", zorder=0)
    ax.set_ylabel("sd of f (epistemic)")
    ax.set_xlabel("x")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
