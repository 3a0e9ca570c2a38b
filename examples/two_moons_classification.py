r"""Two moons: a MAP network's overconfidence, and the linearized-Laplace GP that fixes it.

What it shows
-------------
A small tanh MLP (2-32-32-1, one logit, float64) is trained to a MAP estimate on scikit-learn's
two moons (150 points, noise 0.15): full-batch Adam, then L-BFGS, on
:math:`-\sum_n \log p(y_n\mid f(x_n;\theta)) + \tfrac{\delta_0}{2}\lVert\theta\rVert^2` with
weight decay :math:`\delta_0` (default 1). The trained network, unchanged, becomes
``ntkgp.LinearizedGP`` with ``BernoulliLikelihood``; its predictive probability is the probit
approximation of :math:`\mathbb E[\sigma(f)]` under the Laplace GP posterior of the logit.

Three panels, like Figure 1 of LaplaceRedux.jl, over a grid that reaches far beyond the data:

* **left**: the MAP plug-in :math:`\sigma(f(x;\hat\theta))`; confident (dark red / dark blue)
  almost everywhere, even far from any data;
* **centre**: the LinearizedGP with an untuned prior precision, the training weight decay
  :math:`\delta_0` (the network is a MAP for this prior);
* **right**: the LinearizedGP with :math:`\delta` fitted by the Laplace marginal likelihood
  (Adam on ``model.parameters()``, i.e. on :math:`\log\delta` only; the weights never move).
  Using a :math:`\delta` other than the training weight decay is a post-hoc prior: the GP is
  still a valid linearized-Laplace posterior around the same MAP.

How to read it: colour is :math:`p(y = 1\mid x)` (blue 0, white 0.5, red 1); the black line is
the 0.5 decision boundary, dashed lines the 0.1 / 0.9 contours. The MAP's band between 0.1 and
0.9 is equally thin everywhere, however far from the data. The GP keeps the decision boundary
(the probit approximation never moves it), but its 0.1-0.9 band widens with the distance from
the data, the more so the smaller :math:`\delta` (a weaker prior means larger weight
uncertainty): inputs far out along the boundary get probabilities near 0.5 instead of 0 or 1.
Far from both the data and the boundary the GP stays fairly confident too. Titles give
:math:`\delta` and the log evidence :math:`\log p(y\mid\delta)`; here the evidence prefers a
smaller :math:`\delta` (about 0.2) than the training weight decay. The script prints the
evidence before and after the fit, the training accuracy / NLL of each predictive, and the mean
:math:`\max(p, 1 - p)` over the grid points more than 1 unit from every training point (seed 0:
0.98 for the MAP, 0.95 at :math:`\delta_0`, 0.93 at the fitted :math:`\delta`).

Run: ``.venv/bin/python examples/two_moons_classification.py [--out two_moons.png] [--seed 0]``
(about 10 s on one CPU core, most of it the MAP fit).
``--smoke`` shrinks data, network, steps and grid (:data:`SMOKE`) for a seconds-long test run through the same code.
"""

from __future__ import annotations

import argparse
import time

import matplotlib
import numpy as np
import torch
from sklearn.datasets import make_moons
from torch import Tensor, nn

import ntkgp

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: ``--smoke``: option values of a seconds-long run through the same code (the test suite runs it)
SMOKE = {"n": 40, "width": 8, "map_adam_steps": 20, "map_lbfgs_steps": 5, "steps": 5, "grid": 20}


def make_net(width: int = 32) -> nn.Sequential:
    """A ``2-width-width-1`` tanh MLP in float64 (the global default dtype is left alone)."""
    return nn.Sequential(
        nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).double()


@torch.no_grad()
def gp_probs(model: ntkgp.LinearizedGP, x: Tensor, chunk: int = 500) -> Tensor:
    """Predictive :math:`p(y=1\\mid x)` of the LinearizedGP (probit approximation).

    Predicts ``chunk`` points at a time: the per-point predictive variances are formed per call
    from dense test blocks whose cost grows with the square of the points in one call."""
    model.eval()
    return torch.cat([model.likelihood(model(xb)).probs for xb in x.split(chunk)])


def bernoulli_nll(p: Tensor, y: Tensor) -> float:
    """Mean negative log-likelihood of 0/1 labels ``y`` under probabilities ``p``."""
    p = p.clamp(1e-12, 1 - 1e-12)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def plot(
    path: str, x: np.ndarray, y: np.ndarray, xx: np.ndarray, yy: np.ndarray, panels: list[tuple[str, np.ndarray]]
) -> None:
    """Probability contours with the training data on top, one panel per predictive."""
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.9 * len(panels) + 0.6, 4.9), sharex=True, sharey=True, constrained_layout=True
    )
    levels = np.linspace(0, 1, 21)
    for ax, (title, p) in zip(axes, panels):
        filled = ax.contourf(xx, yy, p, levels=levels, cmap="RdBu_r", vmin=0, vmax=1)
        ax.contour(xx, yy, p, levels=[0.5], colors="k", linewidths=1.5)
        ax.contour(xx, yy, p, levels=[0.1, 0.9], colors="k", linewidths=0.8, linestyles="--")
        ax.scatter(x[y == 0, 0], x[y == 0, 1], s=14, c="C0", edgecolors="k", linewidths=0.5, label="class 0")
        ax.scatter(x[y == 1, 0], x[y == 1, 1], s=14, c="C3", edgecolors="k", linewidths=0.5, label="class 1")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("$x_1$")
        ax.set_aspect("equal")
    axes[0].set_ylabel("$x_2$")
    axes[0].legend(loc="lower left", fontsize=8, framealpha=0.9)
    bar = fig.colorbar(filled, ax=axes, shrink=0.85, pad=0.01, ticks=np.linspace(0, 1, 11))
    bar.set_label("$p(y = 1 \\mid x)$  (lines: 0.5 solid, 0.1 / 0.9 dashed)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Train the MAP, build the GP, fit δ, print the numbers and write the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="two_moons.png", help="path of the figure (default: two_moons.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the network init (default: 0)")
    parser.add_argument("--n", type=int, default=150, help="number of training points (default: 150)")
    parser.add_argument("--noise", type=float, default=0.15, help="make_moons noise (default: 0.15)")
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=1.0,
        help="δ₀: weight decay of the MAP fit and the untuned GP's prior precision (default: 1)",
    )
    parser.add_argument("--steps", type=int, default=300, help="Adam steps on the marginal likelihood (default: 300)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate for log δ (default: 0.1)")
    parser.add_argument("--width", type=int, default=32, help="hidden units per layer (default: 32)")
    parser.add_argument("--map-adam-steps", type=int, default=2000, help="Adam steps of the MAP fit (default: 2000)")
    parser.add_argument(
        "--map-lbfgs-steps", type=int, default=200, help="L-BFGS iterations of the MAP fit (default: 200)"
    )
    parser.add_argument(
        "--grid", type=int, default=160, help="grid points along x1 of the figure; x2 gets 7/8 of them (default: 160)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE) for a seconds-long test run")
    args = parser.parse_args(argv)
    if args.smoke:  # the SMOKE values replace the defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    # --- data and MAP ---------------------------------------------------------------------
    x_np, y_np = make_moons(n_samples=args.n, noise=args.noise, random_state=args.seed)
    x = torch.as_tensor(x_np, dtype=torch.float64)
    y = torch.as_tensor(y_np, dtype=torch.float64)
    torch.manual_seed(args.seed)
    net = make_net(args.width)
    grad_norm = ntkgp.marglik.train_map(
        net,
        ntkgp.likelihoods.BernoulliLikelihood(),
        x,
        y,
        args.weight_decay,
        adam_steps=args.map_adam_steps,
        lbfgs_steps=args.map_lbfgs_steps,
        tolerance_grad=1e-10,
    )
    net.eval()
    t_map = time.perf_counter() - start

    # --- grid well beyond the data --------------------------------------------------------
    lo, hi = x_np.min(0), x_np.max(0)
    pad = 2.5
    g1 = np.linspace(lo[0] - pad, hi[0] + pad, args.grid)
    g2 = np.linspace(lo[1] - pad, hi[1] + pad, args.grid * 7 // 8)
    xx, yy = np.meshgrid(g1, g2)
    grid = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], -1), dtype=torch.float64)
    dist = torch.cdist(grid, x).min(1).values
    far = dist > 1.0  # grid points at least 1 unit from every training point

    # --- the network as a GP: untuned, then δ by marginal likelihood ----------------------
    lik = ntkgp.likelihoods.BernoulliLikelihood()
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=args.weight_decay)
    with torch.no_grad():
        map_grid, map_train = torch.sigmoid(net(grid)[:, 0]), torch.sigmoid(net(x)[:, 0])
        evidence_before = float(model.log_evidence())
    untuned_grid, untuned_train = gp_probs(model, grid), gp_probs(model, x)
    t0 = time.perf_counter()
    ntkgp.marglik.fit_hyperparameters(model, steps=args.steps, lr=args.lr)
    t_fit = time.perf_counter() - t0
    delta = float(model.prior_precision.detach())
    with torch.no_grad():
        evidence_after = float(model.log_evidence())
    fitted_grid, fitted_train = gp_probs(model, grid), gp_probs(model, x)

    # --- report -----------------------------------------------------------------------------
    num_params = sum(p.numel() for p in net.parameters())
    print(
        f"two moons: N = {args.n}, noise = {args.noise}; MLP 2-{args.width}-{args.width}-1 tanh, P = {num_params}; "
        f"solver: {model.solver.name}"
    )
    print(f"MAP fit with weight decay δ₀ = {args.weight_decay:g}: |grad| = {grad_norm:.1e} ({t_map:.1f} s)")
    print(
        f"log evidence: δ = {args.weight_decay:.4g}: {evidence_before:.3f}  ->  fitted δ = {delta:.4g}: "
        f"{evidence_after:.3f}   ({args.steps} Adam steps, {t_fit:.1f} s)\n"
    )
    rows = [
        ("MAP plug-in sigmoid(f)", map_train, map_grid),
        (f"LinearizedGP, δ = δ₀ = {args.weight_decay:.4g}", untuned_train, untuned_grid),
        (f"LinearizedGP, fitted δ = {delta:.4g}", fitted_train, fitted_grid),
    ]
    print(f"| {'predictive':<34} | {'train acc':>9} | {'train NLL':>9} | {'mean max(p,1-p), far grid':>25} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 27}|")
    for name, p_train, p_grid in rows:
        acc = float(((p_train > 0.5).double() == y).double().mean())
        conf = float(torch.maximum(p_grid, 1 - p_grid)[far].mean())
        print(f"| {name:<34} | {acc:>9.3f} | {bernoulli_nll(p_train, y):>9.4f} | {conf:>25.3f} |")
    print(f"\n('far grid': the {int(far.sum())} of {len(grid)} grid points more than 1 unit from every training point)")

    shape = xx.shape
    panels = [
        (
            f"MAP plug-in σ(f)\n(trained with weight decay δ₀ = {args.weight_decay:.3g})",
            map_grid.reshape(shape).numpy(),
        ),
        (
            f"LinearizedGP, untuned δ = δ₀ = {args.weight_decay:.3g}\nlog evidence {evidence_before:.1f}",
            untuned_grid.reshape(shape).numpy(),
        ),
        (
            f"LinearizedGP, marglik-fitted δ = {delta:.3g}\nlog evidence {evidence_after:.1f}",
            fitted_grid.reshape(shape).numpy(),
        ),
    ]
    plot(args.out, x_np, y_np, xx, yy, panels)
    print(f"wrote {args.out}  (total {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
