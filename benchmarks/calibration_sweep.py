r"""Benchmark (issue 16): why the evidence-fitted posterior misses the MAP's NLL, as a sweep over δ.

For each task of :mod:`benchmarks.calibration_tasks` (the same trained networks as
``benchmarks/calibration.py``; share them with ``--networks``), one
``LinearizedGP(net, likelihood, x, y, prior_precision=δ, mode="map")`` is evaluated on a grid of
scalar prior precisions δ and at the evidence optimum (``fit_hyperparameters``). Per δ:

* the log evidence, and its distance below the optimum (nats);
* the probit predictive's test NLL, ECE, accuracy (or RMSE) and OOD AUROC, as in the calibration
  benchmark;
* the mechanism, for the Laplace likelihoods: the median over test points of the posterior logit
  variance of the predicted class, :math:`\operatorname{median}_x \Sigma_{cc}(x)` (the GP's marginal
  variance at the MAP's class) against the median MAP logit margin (top-1 minus top-2 logit;
  Bernoulli: :math:`|f|`), and the median of the training points' largest Λ eigenvalue proxy
  :math:`p_c (1 - p_c)` at the MAP class. The probit shrinks a logit :math:`f` with variance
  :math:`s^2` to :math:`f/\sqrt{1 + \pi s^2/8}`.

Regression tasks keep σ² at its value at the evidence optimum (fitted with δ) for every grid point.
Held-out alternative: the test set is split in two halves by a fixed permutation;
``ntkgp.marglik.fit_by_validation`` scales δ from the evidence optimum to the best NLL on the first
half, and the MAP, the evidence optimum and the validation fit are scored on the second half (and on
the OOD points of the second half).
The last columns say whether each target of issue 16 holds at that δ: NLL ≤ MAP + max(10 %, 0.01),
ECE ≤ max(MAP, 0.02), AUROC ≥ MAP (the laplace-torch comparison is in the calibration benchmark).
The sweep tunes nothing: it reports what each δ would give, to locate the targets relative to the
evidence optimum. The held-out part below tunes δ on one half of the test set and scores the other.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/calibration_sweep.py --tasks mlp_digits --networks /tmp/nets
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ntkgp  # noqa: E402
from benchmarks.calibration import (  # noqa: E402
    _likelihood,
    _ntkgp_predict,
    add_task_arguments,
    run_map,
    score_predictions,
    start_task_report,
)
from benchmarks.calibration_tasks import Task, make_task  # noqa: E402
from benchmarks.harness import finish_report, write_json  # noqa: E402

GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 1e5)


def _margins(task: Task) -> tuple[float, float]:
    """Median MAP logit margin on the test set, and median p(1 - p) of the MAP class on the training set."""
    with torch.no_grad():
        test, train = task.net(task.x_test).double(), task.net(task.x).double()
    if task.kind == "bernoulli":
        p = train[:, 0].sigmoid()
        return float(test[:, 0].abs().median()), float((p * (1 - p)).median())
    top = test.topk(2, dim=1).values
    p = train.softmax(1).max(1).values
    return float((top[:, 0] - top[:, 1]).median()), float((p * (1 - p)).median())


def _logit_variance(model: Any, task: Task) -> float:
    """Median over test points of the GP's posterior variance of the MAP class's logit."""
    with torch.no_grad():
        variance = model(task.x_test).variance.double()
        logits = task.net(task.x_test)
    if task.kind == "bernoulli":
        return float(variance.reshape(-1).median())
    return float(variance.reshape(len(task.x_test), -1).gather(1, logits.argmax(1, keepdim=True)).median())


def _evaluate(model: Any, lik: Any, task: Task) -> dict[str, Any]:
    row = score_predictions(task, *(_ntkgp_predict(model, lik, task, x) for x in (task.x_test, task.x_ood)))
    if task.kind != "gaussian":
        row["logit_variance"] = _logit_variance(model, task)
    return row


def held_out(task: Task, model: Any, lik: Any, delta: float) -> dict[str, Any]:
    """The test set split in two halves (a fixed permutation): ``fit_by_validation`` on the first, starting
    from the evidence optimum ``delta``; the MAP, the evidence optimum and the validation fit scored on the
    second half (and the OOD points of the second half)."""
    n = len(task.y_test)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    first, second = order[: n // 2], order[n // 2 :]
    half = dataclasses.replace(task, x_test=task.x_test[second], y_test=task.y_test[second], x_ood=task.x_ood[second])
    model.prior_precision = delta
    rows: dict[str, Any] = {"map": run_map(half), "evidence": {"delta": delta} | _evaluate(model, lik, half)}
    fit = ntkgp.marglik.fit_by_validation(model, task.x_test[first], task.y_test[first])
    rows["validation"] = {"delta": float(fit.prior_precision.reshape(-1)[0]), "validation_nll": fit.validation_nll}
    rows["validation"] |= {"evaluations": fit.evaluations, "seconds": fit.seconds, "at_grid_edge": fit.at_grid_edge}
    rows["validation"] |= _evaluate(model, lik, half)
    return rows


def sweep(task: Task, grid: tuple[float, ...]) -> dict[str, Any]:
    lik = _likelihood(task)
    y = task.y.double() if task.kind == "gaussian" else task.y
    model = ntkgp.LinearizedGP(task.net, lik, task.x, y, prior_precision="scalar", mode="map")
    started = time.perf_counter()
    fit = ntkgp.marglik.fit_hyperparameters(model)
    optimum = {"delta": float(fit.prior_precision.reshape(-1)[0]), "log_evidence": fit.log_evidence}
    optimum["fit_seconds"] = time.perf_counter() - started
    optimum["noise"] = None if fit.noise is None else fit.noise.tolist()
    optimum |= _evaluate(model, lik, task)
    rows = []
    for delta in grid:
        model.prior_precision = delta
        with torch.no_grad():
            evidence = float(model.log_evidence())
        row = {"delta": delta, "log_evidence": evidence} | _evaluate(model, lik, task)
        rows.append(row)
        print(f"  δ = {delta:g}: { ({k: round(v, 4) for k, v in row.items()}) }", flush=True)
    halves = held_out(task, model, lik, optimum["delta"])
    print(f"  held-out halves: {halves}", flush=True)
    return {"optimum": optimum, "grid": rows, "held_out": halves}


def _targets(row: dict[str, Any], map_row: dict[str, Any]) -> str:
    nll = row["nll"] <= map_row["nll"] + max(0.1 * abs(map_row["nll"]), 0.01)
    ece = row["ece"] <= max(map_row["ece"], 0.02)
    auroc = row["auroc"] >= map_row["auroc"]
    return " ".join(mark if ok else "-" for mark, ok in (("NLL", nll), ("ECE", ece), ("AUROC", auroc)))


def markdown(name: str, entry: dict[str, Any]) -> str:
    """One task's sweep as a markdown table (the optimum's row in bold)."""
    best = entry["optimum"]["log_evidence"]
    metric = "rmse" if "rmse" in entry["map"] else "acc"
    lines = [
        f"{name}: MAP NLL {entry['map']['nll']:.4f}, ECE {entry['map']['ece']:.4f}, AUROC {entry['map']['auroc']:.4f}",
        "",
        f"| δ | log evidence − optimum | test NLL | ECE | {metric} | OOD AUROC | logit variance | targets met |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [(False, r) for r in entry["grid"]] + [(True, entry["optimum"])]
    for is_opt, r in sorted(rows, key=lambda t: t[1]["delta"]):
        cells = [
            f"{r['delta']:.3g}",
            f"{r['log_evidence'] - best:.1f}",
            f"{r['nll']:.4f}",
            f"{r['ece']:.4f}",
            f"{r[metric]:.4f}",
            f"{r['auroc']:.4f}",
            f"{r['logit_variance']:.3g}" if "logit_variance" in r else "",
            _targets(r, entry["map"]),
        ]
        if is_opt:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if "held_out" in entry:
        lines += ["", "Held-out halves (fit δ on one half of the test set, score on the other):", ""]
        lines.append(f"| row | δ | test NLL | ECE | {metric} | OOD AUROC | targets met |")
        lines.append("|---|---:|---:|---:|---:|---:|---|")
        halves = entry["held_out"]
        for label in ("map", "evidence", "validation"):
            r = halves[label]
            delta = f"{r['delta']:.3g}" if "delta" in r else ""
            met = _targets(r, halves["map"]) if label != "map" else ""
            lines.append(
                f"| {label} | {delta} | {r['nll']:.4f} | {r['ece']:.4f} | {r[metric]:.4f} | {r['auroc']:.4f} | {met} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arguments(parser)
    parser.add_argument("--grid", nargs="+", type=float, default=list(GRID))
    args = parser.parse_args(argv)
    report, started = start_task_report(args)
    for name in args.tasks:
        task = make_task(name, args.seed, cache=args.networks)
        entry: dict[str, Any] = {"map": run_map(task)}
        if task.kind != "gaussian":
            entry["map_margin"], entry["train_p1mp"] = _margins(task)
        print(f"== {name}: MAP {entry['map']}", flush=True)
        entry |= sweep(task, tuple(args.grid))
        print(f"  optimum: {entry['optimum']}", flush=True)
        report["tasks"][name] = entry
        write_json(report, args.json, announce=False)
    for name, entry in report["tasks"].items():
        print("\n" + markdown(name, entry))
    finish_report(report, started, args.json)


if __name__ == "__main__":
    main()
