r"""Benchmark (issue 16): calibration of the post-hoc workflows on networks trained here.

Tasks (:mod:`benchmarks.calibration_tasks`): a CNN with BatchNorm on digits, an MLP on digits, an
MLP on breast cancer (Bernoulli), an MLP on diabetes (regression), a CNN on digits trained with
early stopping and no weight decay, and a transformer classifier on token ids. For each task, in one
process, each method's predictive on the test set and on a shifted (OOD) set:

* ``map``: the network's own predictive (softmax / sigmoid; regression: :math:`\mathcal N(f, \hat\sigma^2)`
  with :math:`\hat\sigma^2` the training MSE);
* ``lt_default``: laplace-torch's default, ``Laplace(net, likelihood)`` (last-layer KFAC) then
  ``optimize_prior_precision(method="marglik")``, probit predictive;
* ``lt_all``: laplace-torch on all weights (``"full"`` for P ≤ 4000, else ``"kron"``) plus marglik;
  ``lt_all_diag``: the same with ``"diag"`` (its KFAC refuses BatchNorm);
* ``ntkgp`` rows: ``LinearizedGP(net, likelihood, x, y, prior_precision=<structure>, mode=<mode>)``,
  ``ntkgp.marglik.fit_hyperparameters(model)``, probit predictive (``likelihood(model(x))``):
  ``ntkgp_scalar`` (one δ, ``mode="map"``: the documented default workflow), ``ntkgp_module`` (one δ per
  module), and ``*_auto`` (``mode="auto"``: the linearized model's mode where the network is not at a
  MAP of the stated prior).

laplace-torch has no Bernoulli likelihood: for breast cancer it gets the two-logit network
:math:`(0, f)` (its last layer extended by a zero row), whose softmax is the sigmoid of :math:`f`;
the zero row's 17 parameters become Bayesian too. Regression: laplace-torch gets ``sigma_noise`` =
the MAP's :math:`\hat\sigma` (its default 1 is arbitrary for a given target scale) and fits the prior
precision only; ntkgp fits :math:`\delta` and :math:`\sigma^2`.

Reported: test NLL, ECE (15 bins; regression: the mean coverage gap of the central 10-90 % intervals),
accuracy or RMSE, OOD AUROC (predictive entropy, or predictive variance for regression), and the wall
time of the post-hoc workflow (build, fit, test predictions; the OOD predictions are not timed).
A method that raises is recorded with its error. ``--networks DIR`` keeps the trained networks
(``<task>-<seed>.pt``) so that later runs skip training.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/calibration.py --tasks mlp_digits diabetes --json /tmp/cal.json
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ntkgp  # noqa: E402
from benchmarks.calibration_tasks import TASKS, Task, make_task, map_gradient_norm  # noqa: E402
from benchmarks.harness import finish_report, start_report, write_json  # noqa: E402
from benchmarks.harness import metrics as M  # noqa: E402

#: the ntkgp rows: (label, prior_precision structure, mode); ``ntkgp_scalar`` is the documented default
#: workflow (``mode="map"``, the library default since 2026-12-03; before, ``"auto"``). The ``_map`` labels
#: are the same rows under the names earlier results used.
NTKGP_ROWS = {
    "ntkgp_scalar": ("scalar", "map"),
    "ntkgp_module": ("module", "map"),
    "ntkgp_scalar_auto": ("scalar", "auto"),
    "ntkgp_module_auto": ("module", "auto"),
    "ntkgp_scalar_map": ("scalar", "map"),
    "ntkgp_module_map": ("module", "map"),
}


def _scores(task: Task, probs: Tensor | None, mean: Tensor | None = None, var: Tensor | None = None) -> dict:
    if task.kind == "gaussian":
        return {
            "nll": M.gaussian_nll(mean, var, task.y_test.double()),
            "ece": M.regression_ece(mean, var, task.y_test.double()),
            "rmse": M.rmse(mean, task.y_test.double()),
        }
    y = task.y_test.long()
    return {"nll": M.class_nll(probs, y), "ece": M.ece(probs, y), "acc": M.accuracy(probs, y)}


def score_predictions(task: Task, test: tuple[Tensor, ...], ood: tuple[Tensor, ...]) -> dict:
    """Test NLL, ECE, accuracy or RMSE, and OOD AUROC from a method's test and OOD predictions:
    ``(probs,)`` (class probabilities), or ``(mean, variance)`` for regression (AUROC by the variance)."""
    if task.kind == "gaussian":
        row = _scores(task, None, *test)
        row["auroc"] = M.auroc(test[1], ood[1])
        return row
    row = _scores(task, test[0])
    row["auroc"] = M.auroc(M.entropy(test[0]), M.entropy(ood[0]))
    return row


def _binary(p1: Tensor) -> Tensor:
    return torch.stack([1 - p1, p1], 1)


# ---------------------------------------------------------------- MAP
def run_map(task: Task) -> dict:
    with torch.no_grad():
        out, out_ood = task.net(task.x_test).double(), task.net(task.x_ood).double()
    if task.kind == "gaussian":
        var = torch.full_like(out[:, 0], task.noise)
        row = _scores(task, None, out[:, 0], var)
        row["auroc"] = M.auroc(var, torch.full_like(out_ood[:, 0], task.noise))
        return row
    probs = out.softmax(1) if task.kind == "softmax" else _binary(out[:, 0].sigmoid())
    ood = out_ood.softmax(1) if task.kind == "softmax" else _binary(out_ood[:, 0].sigmoid())
    row = _scores(task, probs)
    row["auroc"] = M.auroc(M.entropy(probs), M.entropy(ood))
    return row


# ---------------------------------------------------------------- laplace-torch
def _two_logits(net: nn.Module) -> nn.Module:
    """A copy whose last Linear gets a zero first row: logits (0, f), softmax = (1 - sigmoid f, sigmoid f)."""
    import copy

    twin = copy.deepcopy(net)
    last_name, last = [(n, m) for n, m in twin.named_modules() if isinstance(m, nn.Linear)][-1]
    new = nn.Linear(last.in_features, 2)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[1] = last.weight[0]
        new.bias[1] = last.bias[0]
    parent = twin
    *path, leaf = last_name.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, leaf, new)
    return twin.eval()


def run_laplace_torch(task: Task, subset: str, structure: str) -> dict:
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    net = _two_logits(task.net) if task.kind == "bernoulli" else task.net
    y = task.y.long() if task.kind != "gaussian" else task.y.unsqueeze(-1)
    loader = DataLoader(TensorDataset(task.x, y), batch_size=128)
    lik = "regression" if task.kind == "gaussian" else "classification"
    kwargs: dict[str, Any] = {"subset_of_weights": subset, "hessian_structure": structure}
    if task.kind == "gaussian":
        kwargs["sigma_noise"] = task.noise**0.5
    started = time.perf_counter()
    la = Laplace(net, lik, **kwargs)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")

    def predict(x: Tensor) -> tuple[Tensor, ...]:
        if task.kind == "gaussian":
            mean, var = la(x)
            return mean.reshape(-1).double(), var.reshape(-1).double() + la.sigma_noise.detach().double() ** 2
        return (la(x, link_approx="probit").double(),)

    test = predict(task.x_test)
    seconds = time.perf_counter() - started
    row = score_predictions(task, test, predict(task.x_ood))
    row["seconds"] = seconds
    row["prior_precision"] = la.prior_precision.detach().reshape(-1).tolist()[:8]
    return row


# ---------------------------------------------------------------- ntkgp
def _likelihood(task: Task) -> Any:
    import gpytorch

    if task.kind == "softmax":
        return ntkgp.likelihoods.SoftmaxLikelihood(num_classes=task.num_classes)
    if task.kind == "bernoulli":
        return ntkgp.likelihoods.BernoulliLikelihood()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = task.noise
    return lik


def _ntkgp_predict(model: Any, lik: Any, task: Task, x: Tensor) -> tuple[Tensor, ...]:
    with torch.no_grad():
        out = lik(model(x))
    if task.kind == "gaussian":
        return out.mean.reshape(-1).double(), out.variance.reshape(-1).double()
    if task.kind == "bernoulli":
        return (_binary(out.probs.double().reshape(-1)),)
    return (out.probs.double(),)


def run_ntkgp(task: Task, structure: str, mode: str) -> dict:
    lik = _likelihood(task)
    y = task.y.double() if task.kind == "gaussian" else task.y
    started = time.perf_counter()
    model = ntkgp.LinearizedGP(task.net, lik, task.x, y, prior_precision=structure, mode=mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = ntkgp.marglik.fit_hyperparameters(model)
    fitted = time.perf_counter()
    test = _ntkgp_predict(model, lik, task, task.x_test)
    seconds = time.perf_counter() - started
    row = score_predictions(task, test, _ntkgp_predict(model, lik, task, task.x_ood))
    finder = model.mode_finder
    state = finder.state(model.prior_precision) if finder is not None else None
    row |= {
        "seconds": seconds,
        "fit_seconds": fit.seconds,
        "build_fit_seconds": fitted - started,
        "mode": model.mode,
        "solver": model.solver.name if state is None else state.solver.name,
        "fit_method": fit.method,
        "gradient_norm": fit.gradient_norm,
        "converged": fit.converged,
        "fit_iterations": fit.iterations,
        "fit_evaluations": fit.evaluations,
        "log_evidence": fit.log_evidence,
        "prior_precision": fit.prior_precision.tolist(),
        "groups": list(model.layout.group_names),
        "noise": None if fit.noise is None else fit.noise.tolist(),
        "newton_iterations_last": None if state is None else state.iterations,
        "warnings": [str(w.message) for w in caught][:3],
    }
    return row


def _run(task: Task, method: str, P: int) -> dict:
    if method == "map":
        return run_map(task)
    if method == "lt_default":
        return run_laplace_torch(task, "last_layer", "kron")
    if method == "lt_all":
        return run_laplace_torch(task, "all", "full" if P <= 4000 else "kron")
    if method == "lt_all_diag":
        return run_laplace_torch(task, "all", "diag")
    return run_ntkgp(task, *NTKGP_ROWS[method])


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tasks --seed --threads --json --networks``, shared with ``calibration_sweep.py``."""
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--networks", type=Path, default=None, help="folder of trained networks: loaded if there, else saved there"
    )


def start_task_report(args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """The report (machine, configuration, an empty ``tasks``) and its start time."""
    report, started = start_report(args)
    report["config"]["json"], report["config"]["networks"] = str(args.json), str(args.networks)
    report["tasks"] = {}
    return report, started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=["map", "lt_default", "lt_all", "ntkgp_scalar", "ntkgp_module"])
    args = parser.parse_args(argv)
    report, started = start_task_report(args)
    for name in args.tasks:
        task = make_task(name, args.seed, cache=args.networks)
        P = sum(p.numel() for p in task.net.parameters())
        entry: dict[str, Any] = {"P": P, "N": task.x.shape[0], "train_seconds": task.train_seconds}
        entry["map_gradient_norm"] = map_gradient_norm(task)
        print(
            f"== {name}: P = {P}, N = {task.x.shape[0]}, MAP-objective gradient norm {entry['map_gradient_norm']:.3g}",
            flush=True,
        )
        for method in args.methods:
            try:
                row = _run(task, method, P)
            except Exception as error:  # a method that does not run on this network is a result, not a crash
                row = {"error": f"{type(error).__name__}: {error}"}
            entry[method] = row
            short = {
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in row.items()
                if k
                in (
                    "nll",
                    "ece",
                    "acc",
                    "rmse",
                    "auroc",
                    "seconds",
                    "mode",
                    "prior_precision",
                    "fit_method",
                    "gradient_norm",
                    "fit_evaluations",
                    "error",
                )
            }
            print(f"  {method}: {short}", flush=True)
            report["tasks"][name] = entry
            write_json(report, args.json, announce=False)
    finish_report(report, started, args.json)


if __name__ == "__main__":
    main()
