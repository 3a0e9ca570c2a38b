r"""Benchmark (issue 5): ntkgp's approximate routes on Friedman-1 regression, against the exact
NTK GP and against laplace-torch's ``FunctionalLaplace`` (subset of data) and ``ELLA`` (Nyström).

Setup (as ``regression_workflow.py``): Friedman-1 (``make_friedman1(n_samples=N + n_test,
n_features=8, noise=1.0, random_state=0)``), the first N rows for training and the last
``n_test`` for testing, inputs and targets standardized on the training rows; the 8-256-256-1
tanh MLP in float32 (P = 68,353), trained full-batch with Adam on
:math:`\tfrac12\lVert y - f\rVert^2 + \tfrac\delta2\lVert\theta\rVert^2` (``--train-steps``).

Part 1: the approximation table (``--n``, default 10,000; 500 test points)
--------------------------------------------------------------------------
Fixed hyperparameters for every method: prior precision δ = 1 and noise σ² = the trained net's
training MSE, so the table compares approximations, not hyperparameter fits. Each row runs
build + log evidence (where the method has one) + latent mean and variance at the test points:

* ``exact``: ntkgp, ``solver="kernel"`` on all N points (dense Cholesky, float64): the reference;
* ``inducing``: ``ntkgp.solvers.Inducing(num_inducing=M)`` (k-means selection by default,
  ``--selection``; predictive mean ``--mean``, default ``network``: f(x*), the laplace-torch
  convention, which FunctionalLaplace and ELLA also use); the evidence is the SGPR collapsed
  lower bound;
* ``sod``: ``ntkgp.solvers.SubsetOfData(indices=...)``: the exact GP of the same M points that
  laplace-torch's ``SoDSampler(N, M, seed=0)`` draws for FunctionalLaplace, with the prior
  variance scaled by M/N (laplace-torch's convention), so the two compute the same approximation
  (``--sod``);
* ``sor``: ``ntkgp.solvers.Inducing(selection=..., prior_residual=False)``, the subset-of-regressors
  (Nyström) predictive on exactly the M points laplace-torch's ``ELLA(..., seed)`` draws
  (``randperm(N)[:M]`` under its seed), i.e. the approximation ELLA computes (``--sor``);
* ``lanczos``: ``ntkgp.solvers.Lanczos(rank=k)``;
* ``cg``: ``ntkgp.solvers.ConjugateGradients()`` with its defaults;
* ``FunctionalLaplace``: laplace-torch ``Laplace(net, "regression", subset_of_weights="all",
  hessian_structure="gp", n_subset=M, sigma_noise=σ, prior_precision=δ)`` fitted on all N points
  (its GP uses a random subset of M of them; its evidence is that of the subset and is not
  comparable to the N-point evidence), predictive ``la(x, pred_type="gp")``;
* ``ELLA``: laplace-torch ``ELLA(net, "regression", subsample_size=M, n_eigenvalues=M,
  sigma_noise=σ, prior_precision=δ)`` (Nyström features from M random points, curvature
  accumulated over all N); it has no marginal likelihood (``log_marginal_likelihood`` raises).

Reported: test NLL of the Gaussian predictive :math:`\mathcal N(y_* \mid \mu_*, v_* + \sigma^2)`
(standardized targets, mean over the test points); variance error
``max |v - v_exact| / max v_exact`` of the latent variance against ``exact``; the log evidence
and its difference to the exact one; wall time (median over ``--repeats``; a configuration
whose first run exceeds ``--long-seconds`` runs once); peak RSS added by the workflow. Every
measurement runs in a fresh ``spawn`` process (imports, data and network loading, and one
untimed warm-up of the same method on a few points are outside the clock), with the peak-RSS
probe ``regression_workflow.py`` uses (``benchmarks.harness.PeakRSS``: ``/proc/self/clear_refs`` + ``VmHWM``).

Part 2: large N (``--large-n``, default 50,000; 1,000 test points)
------------------------------------------------------------------
* ``reference``: exact kernel solver on a random subset of ``--ref-subset`` training points,
  with δ and σ² fitted by maximizing the exact evidence on that subset (L-BFGS, strong Wolfe,
  over ``model.parameters()``, at most ``--ref-iters`` iterations);
* ``inducing`` at each ``--large-m``: build + evidence (collapsed bound) + 1,000 predictions at
  the fixed δ = 1, σ² = train MSE (``fixed``), and the same with δ and σ² fitted by
  ``--fit-steps`` Adam steps (lr ``--fit-lr``) on the negative bound before predicting
  (``fitted``; the fitting time is included in its total).

Usage::

    .venv/bin/python benchmarks/approximate_regression.py --json approx.json            # both parts
    .venv/bin/python benchmarks/approximate_regression.py --n 2000 --inducing 100 300 --ranks 50 \
        --repeats 1 --skip-large                                                        # quick
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import MiB, PeakRSS, PhaseTimer, finish_report, fit_evidence, run_spawned, start_report  # noqa: E402
from benchmarks.regression_workflow import load_setup, make_data, make_net, rmse, save_setup, train_net  # noqa: E402


def gaussian_nll(mean: Tensor, latent_var: Tensor, noise: float, y: Tensor) -> float:
    """Mean test NLL of ``N(y | mean, latent_var + noise)``."""
    var = latent_var.double() + noise
    return float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y.double() - mean.double()) ** 2 / var).mean())


# ----------------------------------------------------------------------- workflows
def _ntkgp_model(net: nn.Module, x: Tensor, y: Tensor, delta: float, noise: float, solver: Any):
    import gpytorch

    import ntkgp

    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = noise
    return ntkgp.LinearizedGP(net, likelihood, x, y, prior_precision=delta, solver=solver), likelihood


def peer_subset(num_data: int, size: int) -> Tensor:
    """The subset laplace-torch's ``SoDSampler(N, M, seed=0)`` draws (FunctionalLaplace's default seed)."""
    import numpy as np

    return torch.as_tensor(np.random.default_rng(0).choice(list(range(num_data)), size, replace=False))


def ella_subset(num_data: int, size: int, seed: int) -> Tensor:
    """The basis points laplace-torch's ``ELLA(..., seed=seed)`` draws from an unshuffled loader."""
    return torch.randperm(num_data, generator=torch.Generator().manual_seed(seed))[:size]


def _spec(
    method: str, param: int | None, selection: str, seed: int, mean: str = "posterior", num_data: int | None = None
):
    import ntkgp

    if method == "exact":
        return "kernel"
    if method == "inducing":
        return ntkgp.solvers.Inducing(
            num_inducing=param, selection=selection, mean=mean, generator=torch.Generator().manual_seed(seed)
        )
    if method == "sor":  # subset of regressors on ELLA's own basis points: the approximation ELLA computes
        assert param is not None and num_data is not None
        return ntkgp.solvers.Inducing(
            num_inducing=param, selection=ella_subset(num_data, param, seed), mean=mean, prior_residual=False
        )
    if method == "lanczos":
        return ntkgp.solvers.Lanczos(rank=param, seed=seed, mean="network" if mean == "network" else "projected")
    if method == "cg":
        return ntkgp.solvers.ConjugateGradients(seed=seed)
    if method == "sod":  # subset of data with laplace-torch's M/N prior rescaling, on the peer's subset
        assert param is not None and num_data is not None
        return ntkgp.solvers.SubsetOfData(indices=peer_subset(num_data, param), mean=mean)
    raise ValueError(method)


def _predict(model, likelihood, x_test: Tensor) -> tuple[Tensor, Tensor]:
    model.eval()
    likelihood.eval()
    with torch.no_grad():
        f = model(x_test)
        return f.mean.detach().double().clone(), f.variance.detach().double().clone()


def workflow_ntkgp(net, data, s: dict, method: str, param: int | None) -> dict:
    """ntkgp: build, log evidence, latent mean and variance at the test points (fixed δ, σ²)."""
    timer = PhaseTimer()
    model, likelihood = _ntkgp_model(
        net,
        data["x"],
        data["y"],
        s["delta"],
        s["noise"],
        _spec(method, param, s["selection"], s["seed"], s.get("mean", "posterior"), data["x"].shape[0]),
    )
    _ = model.solver  # build the solver (it is lazy) inside the "build" phase
    timer.mark("build")
    with torch.no_grad():
        lml = float(model.log_evidence())
    timer.mark("lml")
    mean, var = _predict(model, likelihood, data["x_test"])
    times = timer.stop("predict")
    noise = float(likelihood.noise.detach())
    return {
        "time": times,
        "lml": lml,
        "mean": mean,
        "var": var,
        "noise": noise,
        "delta": s["delta"],
        "solver": model.solver.name,
    }


def workflow_ntkgp_fitted(net, data, s: dict, method: str, param: int | None) -> dict:
    """ntkgp with δ and σ² fitted on the (approximate) evidence, then predictions.

    ``reference``: exact kernel solver on a random subset, L-BFGS. ``inducing_fit``: Adam on the
    collapsed bound over all N points."""
    x, y = data["x"], data["y"]
    if method == "reference":
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(s["seed"]))[:param]
        x, y = x[idx], y[idx]
    timer = PhaseTimer()
    spec = (
        "kernel"
        if method == "reference"
        else _spec("inducing", param, s["selection"], s["seed"], s.get("mean", "posterior"))
    )
    model, likelihood = _ntkgp_model(net, x, y, s["delta"], s["noise"], spec)
    _ = model.solver
    timer.mark("build")
    with torch.no_grad():
        lml_start = float(model.log_evidence())
    timer.mark("lml")
    if method == "reference":
        evaluations = fit_evidence(model, "lbfgs", s["ref_iters"], 1.0, tolerance_grad=1e-6)
    else:
        evaluations = fit_evidence(model, "adam", s["fit_steps"], s["fit_lr"])
    timer.mark("fit")
    with torch.no_grad():
        lml = float(model.log_evidence())
    timer.skip()  # the evidence after the fit: in the total, in no phase
    mean, var = _predict(model, likelihood, data["x_test"])
    times = timer.stop("predict")
    times["total_without_fit"] = times["total"] - times["fit"]
    return {
        "time": times,
        "lml": lml,
        "lml_start": lml_start,
        "mean": mean,
        "var": var,
        "noise": float(likelihood.noise.detach()),
        "delta": float(model.prior_precision.detach().reshape(-1)[0]),
        "evaluations": evaluations,
        "solver": model.solver.name,
        "n_train_used": int(x.shape[0]),
    }


def workflow_peer(net, data, s: dict, method: str, param: int) -> dict:
    """laplace-torch: FunctionalLaplace with n_subset = M, or ELLA with M basis points."""
    from laplace import ELLA, Laplace
    from torch.utils.data import DataLoader, TensorDataset

    sigma = math.sqrt(s["noise"])
    loader = DataLoader(TensorDataset(data["x"], data["y"][:, None]), batch_size=s["peer_batch_size"])
    timer = PhaseTimer()
    if method == "functional_laplace":
        la = Laplace(
            net,
            "regression",
            subset_of_weights="all",
            hessian_structure="gp",
            n_subset=param,
            sigma_noise=sigma,
            prior_precision=s["delta"],
        )
    else:
        la = ELLA(
            net,
            "regression",
            subsample_size=param,
            n_eigenvalues=param,
            sigma_noise=sigma,
            prior_precision=s["delta"],
            seed=s["seed"],
        )
    la.fit(loader)
    timer.mark("build")
    lml = None
    if method == "functional_laplace":
        with torch.no_grad():
            lml = float(la.log_marginal_likelihood())
    timer.mark("lml")
    mean, var = la(data["x_test"], pred_type="gp") if method == "functional_laplace" else la(data["x_test"])
    mean, var = mean.detach().reshape(-1).double().clone(), var.detach().reshape(-1).double().clone()
    times = timer.stop("predict")
    return {
        "time": times,
        "lml": lml,
        "mean": mean,
        "var": var,
        "noise": s["noise"],
        "delta": s["delta"],
        "subset_evidence": method == "functional_laplace",
    }


_SMALL = {
    "inducing": 8,
    "sod": 16,
    "sor": 8,
    "lanczos": 4,
    "functional_laplace": 16,
    "ella": 8,
    "reference": 64,
    "inducing_fit": 8,
}


def measure(method: str, param: int | None, path: str, threads: int, warmup: bool = True) -> dict[str, Any]:
    """One timed, memory-probed run in this (fresh, spawned) process; tensors come back as lists."""
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, data, s = load_setup(path, double=False)
    import gpytorch  # noqa: F401
    import laplace  # noqa: F401

    import ntkgp  # noqa: F401

    peer = method in ("functional_laplace", "ella")
    fitted = method in ("reference", "inducing_fit")
    run = workflow_peer if peer else workflow_ntkgp_fitted if fitted else workflow_ntkgp
    if warmup:  # untimed, on a copy of the net and 64 points: first-call costs out of the clock
        small = {k: v[:64] for k, v in data.items()}
        small_s = dict(s, fit_steps=2, ref_iters=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(copy.deepcopy(net), small, small_s, method, _SMALL.get(method, param))
    with PeakRSS() as probe:
        out = run(net, data, s, method, param)
    out["peak_rss_bytes"] = probe.peak_delta
    out["peak_rss_exact"] = probe.exact
    out["mean"] = out["mean"].tolist()
    out["var"] = out["var"].tolist()
    return out


def run_in_subprocess(method: str, param: int | None, path: str, threads: int, warmup: bool = True) -> dict:
    """:func:`measure` in a fresh ``spawn`` process."""
    return run_spawned(measure, method, param, path, threads, warmup)


# --------------------------------------------------------------------------- driver
def prepare(n: int, n_test: int, args: argparse.Namespace, workdir: Path) -> tuple[str, dict]:
    """Data, trained network and settings, saved for the child processes."""
    data = make_data(n, n_test)
    torch.manual_seed(args.seed)
    net = make_net()
    t0 = time.perf_counter()
    train_rmse = train_net(net, data["x"], data["y"], args.prior_precision, args.train_steps)
    test_rmse = rmse(net, data["x_test"], data["y_test"])
    num_params = sum(p.numel() for p in net.parameters())
    settings = {
        "n": n,
        "n_test": n_test,
        "delta": args.prior_precision,
        "noise": train_rmse**2,
        "train_rmse": train_rmse,
        "test_rmse": test_rmse,
        "num_parameters": num_params,
        "train_seconds": time.perf_counter() - t0,
        "selection": args.selection,
        "mean": args.mean,
        "seed": args.seed,
        "peer_batch_size": max(1, 2**25 // num_params),
        "fit_steps": args.fit_steps,
        "fit_lr": args.fit_lr,
        "ref_iters": args.ref_iters,
    }
    path = save_setup(workdir, net, data, settings)
    print(
        f"N={n}: P={num_params}, train RMSE {train_rmse:.4f} (σ² = {train_rmse**2:.4f}), test RMSE "
        f"{test_rmse:.4f}, trained in {settings['train_seconds']:.1f} s",
        flush=True,
    )
    return path, settings


def repeat(method: str, param: int | None, path: str, args: argparse.Namespace) -> list[dict]:
    """Up to ``--repeats`` fresh-process runs; one only if the first exceeds ``--long-seconds``."""
    runs = []
    for rep in range(args.repeats):
        try:
            out = run_in_subprocess(method, param, path, args.threads, not args.no_warmup)
        except Exception as exc:  # noqa: BLE001 - a failing configuration is reported, not fatal
            print(f"  {method} {param}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            return runs or [{"error": f"{type(exc).__name__}: {exc}"}]
        runs.append(out)
        t = out["time"]
        print(
            f"  {method:>18} {param!s:>6} rep {rep + 1}: {t['total']:.2f} s ("
            + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "total")
            + f"), peak RSS +{out['peak_rss_bytes'] / MiB:.0f} MiB",
            flush=True,
        )
        if t["total"] > args.long_seconds:
            break
    return runs


def summarize(runs: list[dict], truth: dict | None, y_test: Tensor) -> dict[str, Any]:
    """Medians over repeats; accuracy from the first run (all runs are deterministic)."""
    if "error" in runs[0]:
        return {"error": runs[0]["error"]}
    r0 = runs[0]
    mean, var = torch.tensor(r0["mean"]), torch.tensor(r0["var"])
    out = {
        "repeats": len(runs),
        "time_median": statistics.median(r["time"]["total"] for r in runs),
        "phase_median": {k: statistics.median(r["time"][k] for r in runs) for k in r0["time"]},
        "times": [r["time"]["total"] for r in runs],
        "peak_rss_median": statistics.median(r["peak_rss_bytes"] for r in runs),
        "peak_rss_exact": all(r["peak_rss_exact"] for r in runs),
        "nll": gaussian_nll(mean, var, r0["noise"], y_test),
        "lml": r0["lml"],
        "noise": r0["noise"],
        "delta": r0["delta"],
    }
    for key in ("evaluations", "lml_start", "n_train_used", "solver", "subset_evidence"):
        if key in r0:
            out[key] = r0[key]
    if truth is not None:
        tv, tm = torch.tensor(truth["var"]), torch.tensor(truth["mean"])
        out["var_err"] = float((var - tv).abs().max() / tv.abs().max())
        out["var_ratio_median"] = float((var / tv).median())
        out["mean_err"] = float((mean - tm).abs().max() / tm.abs().max())
        if r0["lml"] is not None and not r0.get("subset_evidence", False):
            out["lml_diff"] = r0["lml"] - truth["lml"]
    return out


def table_part1(rows: list[dict]) -> str:
    head = (
        "| method | M / k | time (s) | repeats | peak RSS (MiB) | test NLL | NLL − exact | var err "
        "| median var / exact var | log evidence | − exact |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    exact_nll = next(r["nll"] for r in rows if r["method"] == "exact")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['param']} | failed: {r['error'][:80]} |||||||||")
            continue
        lml = "—" if r["lml"] is None else ("(subset) " if r.get("subset_evidence") else "") + f"{r['lml']:.1f}"
        diff = f"{r['lml_diff']:+.1f}" if "lml_diff" in r else "—"
        lines.append(
            f"| {r['method']} | {r['param'] if r['param'] is not None else '—'} | {r['time_median']:.2f} "
            f"| {r['repeats']} | {r['peak_rss_median'] / MiB:.0f} | {r['nll']:.4f} | {r['nll'] - exact_nll:+.4f} "
            f"| {r.get('var_err', 0.0):.2e} | {r.get('var_ratio_median', 1.0):.3f} | {lml} | {diff} |"
        )
    return "\n".join(lines)


def table_part2(rows: list[dict]) -> str:
    head = (
        "| method | M | time total (s) | time w/o fit (s) | repeats | peak RSS (MiB) | δ | σ² | log evidence "
        "| test NLL | NLL − ref | (NLL − ref) / abs(ref) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = next(r["nll"] for r in rows if r["method"].startswith("reference"))
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['param']} | failed: {r['error'][:80]} ||||||||||")
            continue
        wo = r["phase_median"].get("total_without_fit", r["time_median"])
        lines.append(
            f"| {r['method']} | {r['param']} | {r['time_median']:.2f} | {wo:.2f} | {r['repeats']} "
            f"| {r['peak_rss_median'] / MiB:.0f} | {r['delta']:.4g} | {r['noise']:.4g} | {r['lml']:.1f} "
            f"| {r['nll']:.4f} | {r['nll'] - ref:+.4f} | {(r['nll'] - ref) / abs(ref):+.2%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="part 1 training-set size")
    parser.add_argument("--inducing", type=int, nargs="*", default=[100, 300, 1000, 2000], help="part 1 M list")
    parser.add_argument(
        "--sod",
        type=int,
        nargs="*",
        default=[100, 300, 1000, 2000],
        help="part 1 M list of SubsetOfData (rescaled prior, as the peer)",
    )
    parser.add_argument(
        "--sor",
        type=int,
        nargs="*",
        default=[100, 300, 1000, 2000],
        help="part 1 M list of the subset-of-regressors (ELLA's approximation) rows",
    )
    parser.add_argument("--ranks", type=int, nargs="*", default=[50, 100, 300], help="part 1 Lanczos ranks")
    parser.add_argument("--no-cg", action="store_true", help="skip the CG row")
    parser.add_argument(
        "--peer-m",
        type=int,
        nargs="*",
        default=None,
        help="M list for FunctionalLaplace and ELLA (default: --inducing)",
    )
    parser.add_argument(
        "--ella-m",
        type=int,
        nargs="*",
        default=None,
        help="M list for ELLA (default: the FunctionalLaplace list; empty: skip ELLA)",
    )
    parser.add_argument("--selection", default="kmeans", help="inducing-point selection")
    parser.add_argument(
        "--mean",
        default="network",
        choices=["posterior", "network"],
        help="predictive mean of the inducing and Lanczos routes (network: f(x*), as the peer)",
    )
    parser.add_argument("--large-n", type=int, default=50000, help="part 2 training-set size")
    parser.add_argument("--large-m", type=int, nargs="*", default=[1000, 2000], help="part 2 M list")
    parser.add_argument("--ref-subset", type=int, default=10000, help="part 2 exact reference subset size")
    parser.add_argument("--ref-iters", type=int, default=15, help="L-BFGS iterations of the reference fit")
    parser.add_argument("--fit-steps", type=int, default=40, help="Adam steps of the inducing fit")
    parser.add_argument("--fit-lr", type=float, default=0.05, help="Adam learning rate of the inducing fit")
    parser.add_argument("--skip-small", action="store_true", help="skip part 1")
    parser.add_argument("--skip-large", action="store_true", help="skip part 2")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported)")
    parser.add_argument("--long-seconds", type=float, default=60.0, help="one run only above this time")
    parser.add_argument("--prior-precision", type=float, default=1.0, help="δ, also the training weight decay")
    parser.add_argument("--train-steps", type=int, default=300, help="full-batch Adam steps for the network")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, subsets, probes and selection")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run")
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    report, started = start_report(args)

    with tempfile.TemporaryDirectory(prefix="ntkgp-approx-") as tmp:
        workdir = Path(tmp)
        if not args.skip_small:
            path, settings = prepare(args.n, 500, args, workdir)
            y_test = torch.load(path, weights_only=False)["data"]["y_test"]
            truth_runs = repeat("exact", None, path, args)
            truth = truth_runs[0]
            configs = [("inducing", m) for m in args.inducing] + [("sod", m) for m in args.sod]
            configs += [("sor", m) for m in args.sor]
            configs += [("lanczos", k) for k in args.ranks]
            configs += [] if args.no_cg else [("cg", None)]
            peer_m = args.inducing if args.peer_m is None else args.peer_m
            configs += [("functional_laplace", m) for m in peer_m]
            configs += [("ella", m) for m in (peer_m if args.ella_m is None else args.ella_m)]
            rows = [dict(method="exact", param=None, **summarize(truth_runs, truth, y_test))]
            for method, param in configs:
                rows.append(
                    dict(method=method, param=param, **summarize(repeat(method, param, path, args), truth, y_test))
                )
            report["part1"] = {"settings": settings, "rows": rows, "table": table_part1(rows)}
            print("\n" + report["part1"]["table"] + "\n", flush=True)
        if not args.skip_large:
            path, settings = prepare(args.large_n, 1000, args, workdir)
            y_test = torch.load(path, weights_only=False)["data"]["y_test"]
            rows = [
                dict(
                    method=f"reference (exact, subset {args.ref_subset}, L-BFGS fit)",
                    param=args.ref_subset,
                    **summarize(repeat("reference", args.ref_subset, path, args), None, y_test),
                )
            ]
            for m in args.large_m:
                rows.append(
                    dict(
                        method="inducing, fixed δ=1, σ²=train MSE",
                        param=m,
                        **summarize(repeat("inducing", m, path, args), None, y_test),
                    )
                )
                rows.append(
                    dict(
                        method=f"inducing, fitted ({args.fit_steps} Adam steps)",
                        param=m,
                        **summarize(repeat("inducing_fit", m, path, args), None, y_test),
                    )
                )
            report["part2"] = {"settings": settings, "rows": rows, "table": table_part2(rows)}
            print("\n" + report["part2"]["table"] + "\n", flush=True)

    finish_report(report, started, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
