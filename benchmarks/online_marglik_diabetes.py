r"""Benchmark: online marginal likelihood on diabetes regression, against the post-hoc evidence optimum.

Setup
-----
scikit-learn's ``load_diabetes`` (442 patients, 10 features) is split 80/20 (``--seed``) into 353
training and 89 test points; inputs and targets are standardized with the training statistics.
The network is a float64 MLP ``10-W-W-1`` (``--width`` W = 50, tanh; P = 3,151), initialized from
``--seed``.

* **online marglik**: :func:`ntkgp.marglik.fit_online_marglik` with a GPyTorch
  ``GaussianLikelihood`` (noise starting at 1, i.e. the targets' variance) and one prior
  precision per parameter tensor (``prior_precision=torch.ones(6)``: weight and bias of each
  layer, starting at 1). It trains the network with Adam (``--lr``) on mini-batches of
  ``--batch-size`` for ``--epochs`` epochs on
  :math:`\tfrac{N}{|b|}\sum_{b}\tfrac{(y-f)^2}{2\sigma^2} + \tfrac12\sum_g\delta_g\lVert\theta_g\rVert^2`
  and, every ``--marglik-every`` epochs after ``--burnin``, takes ``--hyper-steps`` Adam steps
  (``--hyper-lr``) on the exact log evidence of the current linearization (``subset_size=None``;
  ``--subset-size`` switches to the subset bound; ``--log-precision`` makes the tuner's Adam
  steps act on :math:`\log\delta`). All marglik settings default to the library's.
* **post-hoc optimum**: the final network, unchanged, becomes
  ``ntkgp.LinearizedGP(net, GaussianLikelihood(noise=learned), x, y, prior_precision=learned)``;
  L-BFGS (strong Wolfe line search, up to ``--lbfgs-iters`` iterations) maximizes its exact log
  evidence ``model.log_evidence()`` over ``model.parameters()`` (the raw per-tensor precisions and
  the raw noise). This is the evidence optimum for *this* network; online marglik, whose
  network changes while the hyperparameters move, should land near it.
* **plain run** (for time only): the same loop at the initial hyperparameters with no marglik
  steps (``burnin = epochs``), median over ``--repeats`` runs, as is the online run's time.

What is reported: both hyperparameter sets side by side (each :math:`\delta_g`, :math:`\sigma`)
with the exact log evidence at each; test RMSE (standardized and in the target's units) and
mean test NLL (standardized units) of the MAP plug-in :math:`\mathcal N(f(x), \sigma^2)` with the
online :math:`\sigma`, and of the GP predictive :math:`\mathcal N(\mu_*, \mathrm{var}_* + \sigma^2)`
at each hyperparameter set; the online tuner's trajectory; times. Stdout gets Markdown tables,
``--json PATH`` a JSON file with the machine info.

Usage::

    flock /tmp/ntkgp-bench.lock .venv/bin/python benchmarks/online_marglik_diabetes.py --json diabetes.json
    .venv/bin/python benchmarks/online_marglik_diabetes.py --epochs 60 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import gpytorch
import torch
from gpytorch.constraints import Positive
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ntkgp  # noqa: E402
from benchmarks.harness import command_line, fit_evidence, machine_summary, run_record, write_json  # noqa: E402
from ntkgp.marglik import fit_online_marglik  # noqa: E402


def load_data(seed: int) -> dict[str, Any]:
    """Diabetes split 80/20, inputs and targets standardized on the training rows (float64)."""
    x, y = load_diabetes(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed)
    mx, sx, my, sy = x_tr.mean(0), x_tr.std(0), y_tr.mean(), y_tr.std()

    def t(a: Any) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float64)

    return {
        "x": t((x_tr - mx) / sx),
        "y": t((y_tr - my) / sy),
        "x_test": t((x_te - mx) / sx),
        "y_test": t((y_te - my) / sy),
        "y_sd": float(sy),
    }


def make_net(width: int, seed: int) -> nn.Sequential:
    """``10-width-width-1`` tanh MLP in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).double()


def gaussian_likelihood(noise: float | Tensor) -> gpytorch.likelihoods.GaussianLikelihood:
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = torch.as_tensor(noise, dtype=torch.float64).detach().clone()
    return lik


def predictive_metrics(mean: Tensor, var: Tensor, y: Tensor, y_sd: float) -> dict[str, float]:
    """RMSE (standardized and original units) and mean Gaussian NLL (standardized units)."""
    rmse = float((mean - y).square().mean().sqrt())
    nll = float((0.5 * torch.log(2 * math.pi * var) + (y - mean).square() / (2 * var)).mean())
    return {"rmse": rmse, "rmse_original_units": rmse * y_sd, "nll": nll}


def gp_predictive(model: ntkgp.LinearizedGP, data: dict[str, Any]) -> dict[str, float]:
    """Test metrics of the GP predictive N(mu, var_f + sigma^2) at the model's current hyperparameters."""
    model.eval()
    model.likelihood.eval()
    with torch.no_grad():
        pred = model.likelihood(model(data["x_test"]))
        out = predictive_metrics(pred.mean, pred.variance, data["y_test"], data["y_sd"])
    model.train()
    model.likelihood.train()
    return out


def hypers(model: ntkgp.LinearizedGP) -> dict[str, Any]:
    return {
        "prior_precision": model.prior_precision.detach().tolist(),
        "noise_sd": float(model.likelihood.noise.detach().sqrt()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = load_data(args.seed)
    n, num_params = data["x"].shape[0], sum(p.numel() for p in make_net(args.width, args.seed).parameters())
    names = [name for name, _ in make_net(args.width, args.seed).named_parameters()]
    print(
        f"diabetes: N train/test = {n}/{data['x_test'].shape[0]}, MLP 10-{args.width}-{args.width}-1 tanh, "
        f"P = {num_params}, {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}",
        flush=True,
    )
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, progress=False)

    plain_times = []
    for _ in range(args.repeats):
        net = make_net(args.width, args.seed)
        result = fit_online_marglik(
            net,
            gaussian_likelihood(1.0),
            data["x"],
            data["y"],
            prior_precision=torch.ones(len(names)),
            burnin=args.epochs,
            generator=torch.Generator().manual_seed(args.seed),
            **common,
        )
        plain_times.append(result.seconds)
    with torch.no_grad():
        plain_rmse = float((net(data["x_test"]).squeeze(-1) - data["y_test"]).square().mean().sqrt())

    online_times, marglik_times = [], []
    for _ in range(args.repeats):
        net = make_net(args.width, args.seed)
        likelihood = gaussian_likelihood(1.0)
        result = fit_online_marglik(
            net,
            likelihood,
            data["x"],
            data["y"],
            prior_precision=torch.ones(len(names)),
            marglik_every=args.marglik_every,
            burnin=args.burnin,
            steps=args.hyper_steps,
            hyper_lr=args.hyper_lr,
            subset_size=args.subset_size,
            generator=torch.Generator().manual_seed(args.seed),
            prior_precision_constraint=Positive(transform=torch.exp, inv_transform=torch.log)
            if args.log_precision
            else None,
            **common,
        )
        online_times.append(result.seconds)
        marglik_times.append(result.marglik_seconds)
    net.eval()
    with torch.no_grad():
        f_test = net(data["x_test"]).squeeze(-1)
    noise = likelihood.noise.detach().reshape(())
    map_plugin = predictive_metrics(f_test, noise.expand_as(f_test), data["y_test"], data["y_sd"])

    # post hoc: the exact evidence of the final network, at the online values and at its optimum
    model = ntkgp.LinearizedGP(
        net, gaussian_likelihood(noise), data["x"], data["y"], prior_precision=result.prior_precision.clone()
    )
    at_online = {"log_evidence": float(model.log_evidence()), **hypers(model), **gp_predictive(model, data)}
    model.train()
    start = time.perf_counter()
    evaluations = fit_evidence(model, "lbfgs", args.lbfgs_iters, 1.0, tolerance_grad=1e-9, tolerance_change=1e-12)
    lbfgs_seconds = time.perf_counter() - start
    at_optimum = {"log_evidence": float(model.log_evidence()), **hypers(model), **gp_predictive(model, data)}
    grad_norm = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None))

    report = {
        "num_train": n,
        "num_parameters": num_params,
        "parameter_names": names,
        "plain_seconds_median": statistics.median(plain_times),
        "plain_seconds_all": plain_times,
        "plain_test_rmse": plain_rmse,
        "y_sd": data["y_sd"],
        "online_seconds_median": statistics.median(online_times),
        "online_seconds_all": online_times,
        "online_marglik_seconds_median": statistics.median(marglik_times),
        "map_plugin": map_plugin,
        "at_online": at_online,
        "at_optimum": at_optimum,
        "lbfgs": {"seconds": lbfgs_seconds, "evaluations": evaluations, "final_grad_norm": grad_norm},
        "tuner_history": result.tuner.history,
    }
    print_tables(report)
    return report


def print_tables(r: dict[str, Any]) -> None:
    on, opt = r["at_online"], r["at_optimum"]
    print("\n### Hyperparameters: online marglik versus the post-hoc exact-evidence optimum (same network)\n")
    print("| hyperparameter | online marglik | evidence optimum (L-BFGS) | ratio |")
    print("|---|---:|---:|---:|")
    for i, name in enumerate(r["parameter_names"]):
        a, b = on["prior_precision"][i], opt["prior_precision"][i]
        print(f"| delta[{name}] | {a:.4g} | {b:.4g} | {a / b:.3f} |")
    print(f"| noise sd sigma | {on['noise_sd']:.4f} | {opt['noise_sd']:.4f} | {on['noise_sd'] / opt['noise_sd']:.3f} |")
    print(
        f"| **log evidence** | {on['log_evidence']:.3f} | {opt['log_evidence']:.3f} | "
        f"gap {opt['log_evidence'] - on['log_evidence']:.3f} nats |"
    )

    print("\n### Test set (89 points; RMSE in standardized units and in the target's units, NLL standardized)\n")
    print("| predictive | RMSE | RMSE (orig.) | NLL |")
    print("|---|---:|---:|---:|")
    m = r["map_plugin"]
    print(f"| MAP plug-in N(f, sigma_online^2) | {m['rmse']:.4f} | {m['rmse_original_units']:.2f} | {m['nll']:.4f} |")
    for label, d in [("GP, online hyperparameters", on), ("GP, evidence optimum", opt)]:
        print(f"| {label} | {d['rmse']:.4f} | {d['rmse_original_units']:.2f} | {d['nll']:.4f} |")
    print(
        f"| (plain run, delta = 1 and sigma = 1 fixed: MAP, RMSE only) | {r['plain_test_rmse']:.4f} | "
        f"{r['plain_test_rmse'] * r['y_sd']:.2f} | - |"
    )

    hist = r["tuner_history"]
    print(f"\n### Online tuner trajectory ({len(hist)} marglik steps; every {max(1, len(hist) // 10)}th shown)\n")
    print("| step | log evidence before | after | noise sd | delta (per tensor) |")
    print("|---:|---:|---:|---:|---|")
    stride = max(1, len(hist) // 10)
    for i, h in enumerate(hist):
        if i % stride == 0 or i == len(hist) - 1:
            print(
                f"| {i} | {h['log_evidence_before']:.2f} | {h['log_evidence_after']:.2f} | "
                f"{math.sqrt(h['noise'][0]):.4f} | {', '.join(f'{d:.3g}' for d in h['prior_precision'])} |"
            )
    print(
        f"\nTime: online marglik {r['online_seconds_median']:.2f} s (marglik steps "
        f"{r['online_marglik_seconds_median']:.2f} s) vs one plain run {r['plain_seconds_median']:.2f} s "
        f"({r['online_seconds_median'] / r['plain_seconds_median']:.2f}x; medians); post-hoc L-BFGS "
        f"{r['lbfgs']['seconds']:.2f} s, {r['lbfgs']['evaluations']} evidence evaluations, final gradient norm "
        f"{r['lbfgs']['final_grad_norm']:.2e}."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--marglik-every", type=int, default=5)
    parser.add_argument("--burnin", type=int, default=10)
    parser.add_argument("--hyper-steps", type=int, default=10)
    parser.add_argument("--hyper-lr", type=float, default=0.1)
    parser.add_argument("--subset-size", type=int, default=None, help="subset bound instead of the exact evidence")
    parser.add_argument(
        "--log-precision",
        action="store_true",
        help="the tuner steps on log(delta) (an exp/log constraint) instead of softplus-raw values",
    )
    parser.add_argument("--lbfgs-iters", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="runs for the median times")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_summary(args.threads, {"gpytorch": gpytorch.__version__})
    start = time.perf_counter()
    report = run(args)
    report |= {
        **run_record(machine, args),
        "total_seconds": time.perf_counter() - start,
        "command": command_line(),
    }
    print(
        f"\nTotal {report['total_seconds']:.0f} s; load average before {machine['load_average_1_5_15']}, "
        f"after {report['load_average_after']}."
    )
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
