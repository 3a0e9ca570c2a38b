r"""Online marginal likelihood: a network and its prior, trained together in one run.

What it shows
-------------
scikit-learn's diabetes data (353 training and 89 test patients, standardized) and a tanh MLP
``10-50-50-1`` (float64, P = 3151) with one prior precision :math:`\delta_g` per parameter
tensor (six) and a learned noise :math:`\sigma`. :func:`ntkgp.marglik.fit_online_marglik` trains
the network with Adam on its MAP objective (the current :math:`\delta` as weight decay, the
current :math:`\sigma` in the Gaussian loss) and, every 5 epochs after 10, takes 10 Adam steps
on :math:`(\delta, \sigma)` by the exact log evidence of the current linearization. No
validation split is needed: the evidence is computed on the training data.

Two tuners are run, the same except for what Adam steps on:

* **softplus** (the default, GPyTorch's ``Positive()``): above :math:`\delta \approx 1` a step
  moves :math:`\delta` by about the learning rate, so large precisions are reached slowly;
* **log** (``prior_precision_constraint=Positive(transform=torch.exp, inv_transform=torch.log)``):
  every step moves :math:`\log\delta`, so groups the evidence wants switched off reach
  :math:`10^4`–:math:`10^6` within tens of steps.

A plain run at :math:`\delta = 1`, :math:`\sigma = 1` (no tuning) is the baseline. After training,
each tuned network becomes ``ntkgp.LinearizedGP`` at its learned values, and the script prints
its exact log evidence and the test RMSE and NLL of the MAP plug-in and of the GP predictive.

How to read the figure
----------------------
* top left: the log evidence after each marglik step. The log tuner climbs higher (about
  -368 against -377).
* top right: the six :math:`\delta_g` (log scale), log tuner solid, softplus dashed. The
  softplus curves of the switched-off groups (first layer, all biases) rise along straight
  lines; the log tuner's rise by orders of magnitude. The last layer's weights go the other way
  (about 0.003): the evidence wants them free.
* bottom left: the noise standard deviation :math:`\sigma`, from 1 to 0.64 (softplus) and 0.68 (log).
* bottom right: test targets against the GP predictive mean of the log-tuned network, with
  :math:`\pm 2` predictive standard deviations (latent plus noise). About 95% of the points should
  have their bar cross the diagonal; the title gives the observed coverage.

Run: ``.venv/bin/python examples/online_marglik.py [--out online_marglik.png] [--seed 0]``
(about 20 s on one CPU core).
``--smoke`` shrinks data, network and epochs (:data:`SMOKE`) for a seconds-long test run through the same code.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import gpytorch
import matplotlib
import torch
from gpytorch.constraints import Interval, Positive
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import ntkgp
from ntkgp.marglik import OnlineMarglikResult, fit_online_marglik

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: ``--smoke``: option values of a seconds-long run through the same code (the test suite runs it); 16 epochs
#: are the fewest with two marglik steps (after the 10 burn-in epochs, every 5)
SMOKE = {"n_train": 100, "width": 8, "epochs": 16}


def load_data(seed: int, n_train: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Diabetes split 80/20, inputs and targets standardized on the training rows (the first ``n_train``
    if given), float64."""
    x, y = load_diabetes(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed)
    x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    mx, sx, my, sy = x_tr.mean(0), x_tr.std(0), y_tr.mean(), y_tr.std()

    def t(a) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float64)

    return t((x_tr - mx) / sx), t((y_tr - my) / sy), t((x_te - mx) / sx), t((y_te - my) / sy)


def make_net(seed: int, width: int = 50) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).double()


def train(
    x: Tensor, y: Tensor, seed: int, constraint: Interval | None, tune: bool, epochs: int, width: int = 50
) -> tuple[nn.Module, gpytorch.likelihoods.GaussianLikelihood, OnlineMarglikResult]:
    """One ``fit_online_marglik`` run; ``tune=False`` is the plain run (no marglik step)."""
    net = make_net(seed, width)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = torch.tensor(1.0, dtype=torch.float64)
    result = fit_online_marglik(
        net,
        likelihood,
        x,
        y,
        prior_precision=torch.ones(6),
        epochs=epochs,
        batch_size=64,
        lr=1e-3,
        marglik_every=5,
        burnin=10 if tune else epochs,
        steps=10,
        hyper_lr=0.1,
        prior_precision_constraint=constraint,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    return net.eval(), likelihood, result


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> float:
    return float((0.5 * torch.log(2 * math.pi * var) + (y - mean).square() / (2 * var)).mean())


def evaluate(net: nn.Module, likelihood, result: OnlineMarglikResult, data) -> dict:
    """Exact log evidence at the learned values; test metrics of the MAP plug-in and the GP predictive."""
    x, y, x_test, y_test = data
    noise = likelihood.noise.detach().reshape(())
    model = ntkgp.LinearizedGP(net, likelihood, x, y, prior_precision=result.prior_precision)
    with torch.no_grad():
        log_evidence = float(model.log_evidence())
        model.eval()
        likelihood.eval()
        pred = likelihood(model(x_test))
        f_map = net(x_test).squeeze(-1)
    mean, var = pred.mean, pred.variance
    return {
        "log_evidence": log_evidence,
        "sigma": float(noise.sqrt()),
        "delta": result.prior_precision.tolist(),
        "map": ((f_map - y_test).square().mean().sqrt().item(), gaussian_nll(f_map, noise.expand_as(f_map), y_test)),
        "gp": ((mean - y_test).square().mean().sqrt().item(), gaussian_nll(mean, var, y_test)),
        "mean": mean,
        "sd": var.sqrt(),
    }


def trajectory(result: OnlineMarglikResult) -> tuple[list[int], list[float], Tensor, list[float]]:
    rows = [r for r in result.history if "log_evidence_after" in r]
    epochs = [r["epoch"] for r in rows]
    return (
        epochs,
        [r["log_evidence_after"] for r in rows],
        torch.tensor([r["prior_precision"] for r in rows]),
        [math.sqrt(r["noise"][0]) for r in rows],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("online_marglik.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--n-train", type=int, default=None, help="use only this many training points (default: all)")
    parser.add_argument("--width", type=int, default=50, help="hidden units per layer (default: 50)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE) for a seconds-long test run")
    args = parser.parse_args(argv)
    if args.smoke:  # the SMOKE values replace the defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_data(args.seed, args.n_train)
    x, y, _, y_test = data
    names = [n for n, _ in make_net(args.seed, args.width).named_parameters()]
    log_space = Positive(transform=torch.exp, inv_transform=torch.log)

    runs = {}
    for label, constraint in [("softplus", None), ("log", log_space)]:
        net, likelihood, result = train(x, y, args.seed, constraint, True, args.epochs, args.width)
        runs[label] = (result, evaluate(net, likelihood, result, data))
    plain, _, plain_result = train(x, y, args.seed, None, False, args.epochs, args.width)
    with torch.no_grad():
        plain_rmse = float((plain(data[2]).squeeze(-1) - y_test).square().mean().sqrt())

    print(
        f"diabetes: {x.shape[0]} training and {y_test.shape[0]} test points, "
        f"MLP 10-{args.width}-{args.width}-1 tanh, {args.epochs} epochs\n"
    )
    print("| tuner | log evidence | sigma | test RMSE / NLL, MAP plug-in | test RMSE / NLL, GP | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (result, ev) in runs.items():
        print(
            f"| {label} | {ev['log_evidence']:.2f} | {ev['sigma']:.3f} | {ev['map'][0]:.3f} / {ev['map'][1]:.3f} "
            f"| {ev['gp'][0]:.3f} / {ev['gp'][1]:.3f} | {result.seconds:.1f} |"
        )
    print(f"| none (delta = 1, sigma = 1) | - | - | {plain_rmse:.3f} / - | - | {plain_result.seconds:.1f} |")
    print("\nlearned delta per tensor (softplus / log):")
    for i, name in enumerate(names):
        print(f"  {name:10s} {runs['softplus'][1]['delta'][i]:10.4g} {runs['log'][1]['delta'][i]:10.4g}")

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for label, style in [("softplus", "--"), ("log", "-")]:
        epochs, evidence, deltas, sigmas = trajectory(runs[label][0])
        axes[0, 0].plot(epochs, evidence, style, label=f"{label} tuner")
        for g, name in enumerate(names):
            axes[0, 1].semilogy(epochs, deltas[:, g], style, color=colors[g], label=name if label == "log" else None)
        axes[1, 0].plot(epochs, sigmas, style, label=f"{label} tuner")
    axes[0, 0].set(xlabel="epoch", ylabel="log evidence (after the marglik step)", title="exact log evidence")
    axes[0, 0].legend()
    axes[0, 1].set(xlabel="epoch", ylabel=r"$\delta_g$", title=r"prior precisions (solid: log, dashed: softplus)")
    axes[0, 1].legend(fontsize=8, ncol=2)
    axes[1, 0].set(xlabel="epoch", ylabel=r"$\sigma$ (standardized)", title="noise standard deviation")
    axes[1, 0].legend()
    ev = runs["log"][1]
    covered = float(((ev["mean"] - y_test).abs() <= 2 * ev["sd"]).double().mean())
    axes[1, 1].errorbar(ev["mean"], y_test, xerr=2 * ev["sd"], fmt="o", ms=3, alpha=0.6, elinewidth=0.8)
    lim = [float(min(ev["mean"].min(), y_test.min())) - 0.3, float(max(ev["mean"].max(), y_test.max())) + 0.3]
    axes[1, 1].plot(lim, lim, "k--", lw=1)
    axes[1, 1].set(
        xlabel=r"GP predictive mean $\pm 2$ sd",
        ylabel="test target",
        title=f"test, log tuner: RMSE {ev['gp'][0]:.3f}, NLL {ev['gp'][1]:.3f}, {100 * covered:.0f}% within 2 sd",
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}  (total {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
