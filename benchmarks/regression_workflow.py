r"""Benchmark: the linearized-Laplace regression workflow, ntkgp versus laplace-torch.

Workflow (timed end to end, for each library, on the same trained network)
--------------------------------------------------------------------------
1. build the GP / Laplace object on the N training points;
2. compute the log marginal likelihood once, at fixed prior precision δ (default 1.0) and
   noise σ (the trained network's training RMSE);
3. predict the latent (function-space) mean and variance at 500 test points.

* **ntkgp**: ``LinearizedGP(net, GaussianLikelihood() with noise σ², X, y, prior_precision=δ)``,
  ``model.log_evidence()``, ``model.eval(); f = model(X_test); f.mean, f.variance``.
* **peer**: laplace-torch's ``FunctionalLaplace`` (``Laplace(net, "regression",
  subset_of_weights="all", hessian_structure="gp", n_subset=N, sigma_noise=σ,
  prior_precision=δ)``), ``la.fit(DataLoader(...))``, ``la.log_marginal_likelihood()``,
  ``la(X_test, pred_type="gp")`` (FunctionalLaplace's name for the GLM predictive; the
  installed laplace-torch refuses ``"glm"`` for it). With ``n_subset=N`` its subset-of-data sampler
  (``SoDSampler``, ``seed=0``) draws all N points without replacement, i.e. it uses the full
  data in a permuted order, so both libraries compute the same exact GP. Its data-loader batch
  size (``--peer-batch-size``) defaults to ``2**25 // P`` rows, the Jacobian-block size of
  ntkgp's default chunking, so both hold Jacobian blocks of the same size.

Setup: Friedman-1 (``make_friedman1(n_samples=N + 500, n_features=8, noise=1.0,
random_state=0)``), the first N rows for training and the last 500 for testing, inputs and
targets standardized on the training rows; an 8-256-256-1 tanh MLP in float32
(P = 68,353), trained full-batch with Adam on
:math:`\tfrac12\lVert y - f\rVert^2 + \tfrac{\delta}{2}\lVert\theta\rVert^2` (weight decay that
matches δ). The fit is brief on purpose: what is measured is the GP, not the network.

What is reported, per N
-----------------------
* **time**: wall-clock seconds (``time.perf_counter``) of steps 1-3, median over
  ``--repeats`` runs; the two libraries run alternately (peer, ntkgp, peer, ntkgp, ...). The
  clock excludes process start, imports and loading the network and data; unless
  ``--no-warmup``, each process first runs the same workflow once, untimed, on 16 points (on a
  copy of the network), so one-off first-call costs (functorch / BackPACK set-up, thread-pool
  start) are not counted for either library.
* **peak memory**: every measurement runs in its own fresh process (``multiprocessing``
  "spawn"), so no library sees another's allocations or allocator caches. In that process,
  after imports and loading, the kernel's peak-RSS counter (``VmHWM`` in
  ``/proc/self/status``) is reset by writing ``5`` to ``/proc/self/clear_refs`` and the
  current RSS is read; the figure is ``VmHWM`` after the workflow minus that baseline, i.e.
  the peak resident memory the workflow itself added, sampled exactly by the kernel (no
  polling). ``tracemalloc`` would miss torch's C++ allocations, and ``ru_maxrss`` alone
  cannot be reset. If ``clear_refs`` is not writable, the peak falls back to ``ru_maxrss``
  minus the baseline RSS (an upper bound), and the JSON records that.
* **variance error**: ``max |var - var_true| / max var_true`` over the 500 test points, where
  the truth is ntkgp on a float64 copy of the network (``copy.deepcopy(net).double()``) with
  float64 data: exact Cholesky in float64 throughout. ``--selfcheck`` cross-checks that truth
  at N = 200 against kernel-space algebra done by hand (per-example Jacobians with
  ``torch.func``, :math:`K = JJ^\top/\delta`, Cholesky of :math:`K + \sigma^2 I`), using σ² exactly
  as the GPyTorch likelihood stores it (its softplus round trip moves σ² by ~1e-9, which is
  otherwise the largest difference). laplace-torch forms :math:`K` and its Cholesky in the
  network's dtype, so in float32 its variance error is that of float32 linear algebra; run on a
  float64 copy of the network it agrees with the truth to ~1e-8 (checked at N = 200).
  Latent means are in the JSON (``mean_err``) but not the table: the peer's mean is the
  network output :math:`f(x_*;\hat\theta)`, ntkgp's the linearized posterior mean, which differ
  unless :math:`\hat\theta` is an exact MAP.
* **log marginal likelihood** of each. laplace-torch's ``FunctionalLaplace`` returns
  ``log p(y | f̂) - ½(log|K + σ²I| + rᵀ(K + σ²I)⁻¹r)``, which is the exact GP evidence plus
  ``log p(y | f̂) + (N/2) log 2π`` (``log p(y | f̂)`` being the training log likelihood of
  the network's own predictions). The table gives that raw value and its relative error
  after subtracting the extra term (``la.log_likelihood + N/2 log 2π``, taken outside the
  timed region), so the two evidences can be compared.

Results go to stdout as a Markdown table and, with ``--json PATH``, to a JSON file together
with the machine (CPU model, cores, torch version and threads).

Usage::

    .venv/bin/python benchmarks/regression_workflow.py --n 1000 2000 4000 --repeats 3 --json bench.json
    .venv/bin/python benchmarks/regression_workflow.py --n 200 --repeats 1 --selfcheck   # quick
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

import numpy as np
import torch
from sklearn.datasets import make_friedman1
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import MiB, PeakRSS, PhaseTimer, max_rel_err, run_spawned, start_report, write_json  # noqa: E402

N_TEST = 500
N_FEATURES = 8
WIDTH = 256


# --------------------------------------------------------------------------- setup
def make_net(width: int = WIDTH) -> nn.Sequential:
    """The 8-256-256-1 tanh MLP (float32, P = 68,353)."""
    return nn.Sequential(
        nn.Linear(N_FEATURES, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 1),
    ).float()


def make_data(n: int, n_test: int = N_TEST) -> dict[str, Tensor]:
    """Friedman-1 with ``n`` training and ``n_test`` test rows, standardized on the training rows (float32)."""
    x, y = make_friedman1(n_samples=n + n_test, n_features=N_FEATURES, noise=1.0, random_state=0)
    x_tr, x_te, y_tr, y_te = x[:n], x[n:], y[:n], y[n:]
    mu_x, sd_x = x_tr.mean(0), x_tr.std(0)
    mu_y, sd_y = y_tr.mean(), y_tr.std()

    def f32(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    return {
        "x": f32((x_tr - mu_x) / sd_x),
        "y": f32((y_tr - mu_y) / sd_y),
        "x_test": f32((x_te - mu_x) / sd_x),
        "y_test": f32((y_te - mu_y) / sd_y),
    }


def train_net(net: nn.Module, x: Tensor, y: Tensor, delta: float, steps: int, lr: float = 3e-3) -> float:
    r"""Full-batch Adam on :math:`(\tfrac12\lVert y-f\rVert^2 + \tfrac\delta2\lVert\theta\rVert^2)/N`.
    Returns the training RMSE."""
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        resid = y - net(x).squeeze(-1)
        loss = (0.5 * resid.pow(2).sum() + 0.5 * delta * sum(p.pow(2).sum() for p in params)) / x.shape[0]
        loss.backward()
        opt.step()
    net.eval()
    return rmse(net, x, y)


def rmse(net: nn.Module, x: Tensor, y: Tensor) -> float:
    """Root mean squared error of the network's outputs (last dimension squeezed) against ``y``."""
    with torch.no_grad():
        return float((y - net(x).squeeze(-1)).pow(2).mean().sqrt())


# ---------------------------------------------------------------- child processes
def save_setup(workdir: Path, net: nn.Module, data: dict[str, Tensor], settings: dict[str, Any]) -> str:
    """Save the trained network's weights, the data and the settings for the child processes.

    Returns the file's path, ``<workdir>/setup_<settings["n"]>.pt``, which :func:`load_setup` reads.
    """
    path = str(workdir / f"setup_{settings['n']}.pt")
    torch.save({"state": net.state_dict(), "data": data, "settings": settings}, path)
    return path


def load_setup(path: str, double: bool) -> tuple[nn.Module, dict[str, Tensor], dict[str, Any]]:
    """Load the trained network, the data and the settings saved by the parent."""
    blob = torch.load(path, weights_only=False)
    net = make_net()
    net.load_state_dict(blob["state"])
    net.eval()
    data = blob["data"]
    if double:
        net = copy.deepcopy(net).double()
        data = {k: v.double() for k, v in data.items()}
    return net, data, blob["settings"]


def _workflow_ntkgp(net: nn.Module, data: dict[str, Tensor], delta: float, sigma: float, double: bool) -> dict:
    """ntkgp: build, log evidence, latent predictive at the test points."""
    import gpytorch

    import ntkgp

    timer = PhaseTimer()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    if double:
        likelihood = likelihood.double()
    likelihood.noise = sigma**2
    model = ntkgp.LinearizedGP(net, likelihood, data["x"], data["y"], prior_precision=delta)
    timer.mark("build")
    with torch.no_grad():
        lml = float(model.log_evidence())
    timer.mark("lml")
    model.eval()
    likelihood.eval()
    with torch.no_grad():
        f = model(data["x_test"])
        mean, var = f.mean.detach().clone(), f.variance.detach().clone()
    times = timer.stop("predict")
    noise = float(likelihood.noise.detach())  # σ² as stored (GPyTorch's softplus round trip moves it slightly)
    return {"time": times, "lml": lml, "mean": mean, "var": var, "solver": model.solver.name, "noise": noise}


def _workflow_peer(net: nn.Module, data: dict[str, Tensor], delta: float, sigma: float, batch_size: int) -> dict:
    """laplace-torch FunctionalLaplace: fit, log marginal likelihood, GLM predictive."""
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    n = data["x"].shape[0]
    timer = PhaseTimer()
    la = Laplace(
        net,
        "regression",
        subset_of_weights="all",
        hessian_structure="gp",
        n_subset=n,
        sigma_noise=sigma,
        prior_precision=delta,
    )
    la.fit(DataLoader(TensorDataset(data["x"], data["y"][:, None]), batch_size=batch_size))
    timer.mark("build")
    with torch.no_grad():
        lml = float(la.log_marginal_likelihood())
    timer.mark("lml")
    # this laplace-torch build accepts only pred_type="gp" for FunctionalLaplace (the GLM predictive as a GP)
    mean, var = la(data["x_test"], pred_type="gp")
    mean, var = mean.detach().reshape(-1).clone(), var.detach().reshape(-1).clone()
    times = timer.stop("predict")
    # outside the clock: the extra term laplace-torch adds to the GP evidence (see the docstring)
    extra = float(la.log_likelihood) + 0.5 * n * math.log(2 * math.pi)
    subset = la.train_loader.sampler.indices.tolist()  # the subset-of-data draw: all N points?
    return {
        "time": times,
        "lml": lml,
        "lml_extra": extra,
        "mean": mean,
        "var": var,
        "sod_uses_all": len(subset) == n and len(set(subset)) == n,
    }


def measure(library: str, path: str, threads: int, warmup: bool = True) -> dict[str, Any]:
    """Run one timed, memory-probed workflow in this (fresh, spawned) process.

    ``library`` is ``"ntkgp"``, ``"peer"`` or ``"truth"`` (ntkgp in float64). With ``warmup``, the
    same workflow first runs once, untimed, on 16 points. Tensors come back as lists.
    """
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # backpack, harmless here
    torch.set_num_threads(threads)
    double = library == "truth"
    net, data, settings = load_setup(path, double)
    # import outside the measured region
    if library == "peer":
        import laplace  # noqa: F401
    else:
        import gpytorch  # noqa: F401

        import ntkgp  # noqa: F401
    delta, sigma = settings["delta"], settings["sigma"]
    if warmup:  # one untimed run on 16 points, on a copy of the network: first-call costs out of the clock
        small = {k: v[:16] for k, v in data.items()}
        if library == "peer":
            _workflow_peer(copy.deepcopy(net), small, delta, sigma, settings["peer_batch_size"])
        else:
            _workflow_ntkgp(copy.deepcopy(net), small, delta, sigma, double)
    with PeakRSS() as probe:
        if library == "peer":
            out = _workflow_peer(net, data, delta, sigma, settings["peer_batch_size"])
        else:
            out = _workflow_ntkgp(net, data, delta, sigma, double)
    out["peak_rss_bytes"] = probe.peak_delta
    out["peak_rss_exact"] = probe.exact
    out["mean"] = out["mean"].double().tolist()
    out["var"] = out["var"].double().tolist()
    out["threads"] = torch.get_num_threads()
    return out


def run_in_subprocess(library: str, path: str, threads: int, warmup: bool = True) -> dict[str, Any]:
    """:func:`measure` in a fresh ``spawn`` process (one task per process)."""
    return run_spawned(measure, library, path, threads, warmup)


# ---------------------------------------------------------------------- selfcheck
def hand_kernel_space(
    net: nn.Module, data: dict[str, Tensor], delta: float, sigma: float, chunk: int = 100
) -> dict[str, Any]:
    r"""The linearized-Laplace GP by hand, in float64: per-example Jacobians with ``torch.func``
    (``vmap(jacrev)``), :math:`K = JJ^\top/\delta`, Cholesky of :math:`K + \sigma^2 I`."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}

    def f_single(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(net, p, (x.unsqueeze(0),)).reshape(())

    per_example = vmap(jacrev(f_single), in_dims=(None, 0))

    def jacobian(x: Tensor) -> Tensor:
        blocks = []
        for start in range(0, x.shape[0], chunk):
            jac = per_example(params, x[start : start + chunk])
            blocks.append(torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], dim=1))
        return torch.cat(blocks, dim=0)

    x, y, xs = data["x"], data["y"], data["x_test"]
    jac, jac_star = jacobian(x), jacobian(xs)
    theta = torch.cat([p.reshape(-1) for p in params.values()])
    with torch.no_grad():
        f, f_star = net(x).reshape(-1), net(xs).reshape(-1)
    resid = y - f + jac @ theta  # y minus the prior mean f - J θ̂
    gram = jac @ jac.T / delta + sigma**2 * torch.eye(x.shape[0], dtype=x.dtype)
    chol = torch.linalg.cholesky(gram)
    alpha = torch.cholesky_solve(resid[:, None], chol)[:, 0]
    cross = jac_star @ jac.T / delta
    mean = f_star - jac_star @ theta + cross @ alpha
    var = (jac_star * jac_star).sum(1) / delta - (cross * torch.cholesky_solve(cross.T, chol).T).sum(1)
    lml = -0.5 * (resid @ alpha + 2 * chol.diagonal().log().sum() + x.shape[0] * math.log(2 * math.pi))
    return {"mean": mean, "var": var, "lml": float(lml), "num_parameters": int(theta.numel())}


# ---------------------------------------------------------------------- reporting
def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The per-N results as a Markdown table."""
    header = (
        "| N | ntkgp time (s) | peer time (s) | ntkgp/peer | ntkgp peak RSS (MiB) | peer peak RSS (MiB) "
        "| ntkgp var err | peer var err | log evidence (truth) | ntkgp lml rel err | peer lml (raw) "
        "| peer lml rel err (corrected) |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['ntkgp']['time_median']:.2f} | {r['peer']['time_median']:.2f} | {r['ratio']:.2f} "
            f"| {r['ntkgp']['peak_rss_median'] / MiB:.0f} | {r['peer']['peak_rss_median'] / MiB:.0f} "
            f"| {r['ntkgp']['var_err']:.1e} | {r['peer']['var_err']:.1e} | {r['truth']['lml']:.2f} "
            f"| {r['ntkgp']['lml_err']:.1e} | {r['peer']['lml_raw']:.2f} | {r['peer']['lml_err']:.1e} |"
        )
    return "\n".join(lines)


def summarize(runs: list[dict[str, Any]], truth: dict[str, Any], corrected: bool) -> dict[str, Any]:
    """Medians over repeats and worst-case errors against the float64 truth."""
    lml_t = truth["lml"]
    lml = [r["lml"] - (r.get("lml_extra", 0.0) if corrected else 0.0) for r in runs]
    out = {
        "time_median": statistics.median(r["time"]["total"] for r in runs),
        "phase_median": {k: statistics.median(r["time"][k] for r in runs) for k in ("build", "lml", "predict")},
        "times": [r["time"]["total"] for r in runs],
        "peak_rss_median": statistics.median(r["peak_rss_bytes"] for r in runs),
        "peak_rss": [r["peak_rss_bytes"] for r in runs],
        "peak_rss_exact": all(r["peak_rss_exact"] for r in runs),
        "var_err": max(max_rel_err(r["var"], truth["var"]) for r in runs),
        "mean_err": max(max_rel_err(r["mean"], truth["mean"]) for r in runs),
        "lml_raw": runs[0]["lml"],
        "lml_err": max(abs(v - lml_t) / abs(lml_t) for v in lml),
    }
    for key in ("solver", "sod_uses_all"):
        if key in runs[0]:
            out[key] = runs[0][key]
    return out


# --------------------------------------------------------------------------- main
def prepare(n: int, args: argparse.Namespace, workdir: Path) -> tuple[str, nn.Module, dict[str, Tensor], dict]:
    """Data, trained network and settings for size ``n``, saved for the child processes."""
    data = make_data(n)
    torch.manual_seed(args.seed)
    net = make_net()
    t0 = time.perf_counter()
    train_rmse = train_net(net, data["x"], data["y"], args.prior_precision, args.train_steps)
    num_params = sum(p.numel() for p in net.parameters())
    test_rmse = rmse(net, data["x_test"], data["y_test"])
    settings = {
        "n": n,
        "delta": args.prior_precision,
        "sigma": train_rmse,
        "peer_batch_size": args.peer_batch_size or max(1, 2**25 // num_params),
        "num_parameters": num_params,
        "train_rmse": train_rmse,
        "test_rmse": test_rmse,
        "train_seconds": time.perf_counter() - t0,
    }
    path = save_setup(workdir, net, data, settings)
    return path, net, data, settings


def selfcheck(args: argparse.Namespace, workdir: Path, threads: int, n: int = 200) -> dict[str, Any]:
    """Cross-check the float64 truth (ntkgp in float64) against hand kernel-space algebra at ``n``."""
    path, _, _, settings = prepare(n, args, workdir)
    truth = run_in_subprocess("truth", path, threads)
    net, data, _ = load_setup(path, double=True)
    # the hand algebra uses the noise exactly as the likelihood stored it (see _workflow_ntkgp)
    hand = hand_kernel_space(net, data, settings["delta"], math.sqrt(truth["noise"]))
    result = {
        "n": n,
        "num_parameters": hand["num_parameters"],
        "var_rel_err": max_rel_err(truth["var"], hand["var"].tolist()),
        "mean_rel_err": max_rel_err(truth["mean"], hand["mean"].tolist()),
        "lml_rel_err": abs(truth["lml"] - hand["lml"]) / abs(hand["lml"]),
        "lml_truth": truth["lml"],
        "lml_hand": hand["lml"],
    }
    # float64 throughout; agreement is ~1e-11 in practice, the variance being a difference of large numbers
    result["passed"] = max(result["var_rel_err"], result["mean_rel_err"], result["lml_rel_err"]) < 1e-8
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print / write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 4000], help="training-set sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library and N (median reported)")
    parser.add_argument("--prior-precision", type=float, default=1.0, help="δ, also the training weight decay")
    parser.add_argument("--train-steps", type=int, default=300, help="full-batch Adam steps for the network")
    parser.add_argument(
        "--peer-batch-size", type=int, default=None, help="laplace-torch DataLoader batch size (default: 2**25 // P)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in every run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network initialization")
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed 16-point warm-up run in each process"
    )
    parser.add_argument("--selfcheck", action="store_true", help="check the float64 truth by hand at N=200")
    args = parser.parse_args(argv)
    report, started = start_report(args)
    report["results"] = []

    with tempfile.TemporaryDirectory(prefix="ntkgp-bench-") as tmp:
        workdir = Path(tmp)
        if args.selfcheck:
            check = selfcheck(args, workdir, args.threads)
            report["selfcheck"] = check
            status = "passed" if check["passed"] else "FAILED"
            print(
                f"selfcheck (N={check['n']}, P={check['num_parameters']}): float64 ntkgp vs hand algebra: "
                f"var {check['var_rel_err']:.1e}, mean {check['mean_rel_err']:.1e}, "
                f"lml {check['lml_rel_err']:.1e} -> {status}",
                flush=True,
            )
        for n in args.n:
            path, _, _, settings = prepare(n, args, workdir)
            print(
                f"N={n}: P={settings['num_parameters']}, train RMSE {settings['train_rmse']:.3f}, "
                f"test RMSE {settings['test_rmse']:.3f}, trained in {settings['train_seconds']:.1f} s; "
                f"peer batch size {settings['peer_batch_size']}",
                flush=True,
            )
            truth = run_in_subprocess("truth", path, args.threads, not args.no_warmup)
            runs: dict[str, list[dict[str, Any]]] = {"peer": [], "ntkgp": []}
            for rep in range(args.repeats):
                for library in ("peer", "ntkgp"):
                    out = run_in_subprocess(library, path, args.threads, not args.no_warmup)
                    runs[library].append(out)
                    print(
                        f"  repeat {rep + 1}/{args.repeats} {library:>5}: {out['time']['total']:.2f} s "
                        f"(build {out['time']['build']:.2f}, lml {out['time']['lml']:.2f}, "
                        f"predict {out['time']['predict']:.2f}), peak RSS +{out['peak_rss_bytes'] / MiB:.0f} MiB",
                        flush=True,
                    )
            row = {
                "n": n,
                "settings": settings,
                "truth": {k: truth[k] for k in ("lml", "time", "peak_rss_bytes", "noise", "solver")},
                "ntkgp": summarize(runs["ntkgp"], truth, corrected=False),
                "peer": summarize(runs["peer"], truth, corrected=True),
            }
            row["ratio"] = row["ntkgp"]["time_median"] / row["peer"]["time_median"]
            report["results"].append(row)

    report["wall_seconds"] = time.perf_counter() - started
    table = markdown_table(report["results"])
    print()
    print(table)
    print(
        "\ntime: median wall seconds of build + log evidence + predict at 500 test points; peak RSS: resident memory "
        "added by that workflow (fresh process each); var err: max |var - var64| / max var64 against ntkgp in "
        "float64; peer lml corrected: minus log p(y|f) + N/2 log 2pi (see the docstring)."
    )
    print(f"total wall time {report['wall_seconds']:.1f} s")
    report["table"] = table
    write_json(report, args.json)
    return 0 if report.get("selfcheck", {}).get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
