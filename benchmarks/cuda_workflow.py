r"""Benchmark (issues 4 and 5, GPU targets): the exact and inducing workflows on CUDA.

Run it on a machine with a GPU; ``--device cpu`` with small sizes checks the script itself.
Everything runs in one process; GPU times are wall clock around ``torch.cuda.synchronize()``;
memory is ``torch.cuda.max_memory_allocated`` (reset before each workflow; the model data, net
and test inputs are already on the device), or peak RSS on CPU.

Part ``peak``: the device's own GEMM rates. Median of 5 timed ``torch.mm`` of 8192 x 8192
matrices, in float64 and in float32 with TF32 off (IEEE), after 2 warm-ups. These are the
denominators of the "fraction of peak" figures below.

Part ``exact`` (issue 4): the whole regression workflow of ``regression_workflow.py`` (Friedman-1,
8-256-256-1 tanh MLP in float32, P = 68,353, δ = 1, σ² = training MSE): build the
``LinearizedGP`` (kernel solver), log evidence, latent mean and variance at 500 test points.
For each ``--exact-n``: median time of ``--repeats`` runs after one untimed warm-up on 64
points; the variance error ``max |v - v_true| / max v_true`` against ntkgp on a float64 copy of
the network and data (the truth whose selfcheck is in ``regression_workflow.py``); the time of
the structured NTK Gram alone (``ntkgp.ntk.gram``, float64 accumulation) and its achieved
rate, counting only the Gram GEMM flops
:math:`\sum_\text{layers} 2 N^2 (d_\text{in} + 1 + d_\text{out})` times the fraction of blocks a
symmetric Gram computes; the evidence phase's rate counting the Cholesky's :math:`N^3/3`.
With ``--peer`` laplace-torch's ``FunctionalLaplace`` (``n_subset=N``) runs the same workflow
on the same device, once per N.

Part ``large`` (issue 5): ``--large-n`` training points (default 200,000) and 1,000 test points,
the same MLP trained on the device. Per ``--large-m``: ``Inducing(M)`` (k-means selection,
network mean) build + collapsed bound + ``--fit-steps`` Adam steps on δ and σ² + predictions,
with time per phase, peak memory and test NLL; and the exact GP on a random subset of
``--ref-subset`` points with δ, σ² fitted by L-BFGS as the reference NLL.

Usage::

    python benchmarks/cuda_workflow.py --json cuda.json                         # on the GPU
    python benchmarks/cuda_workflow.py --device cpu --exact-n 300 --large-n 2000 \
        --large-m 100 --ref-subset 500 --repeats 1                               # smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.approximate_regression import gaussian_nll  # noqa: E402
from benchmarks.harness import DeviceClock, GiB, PeakMemory, fit_evidence, gemm_rate, machine_info, write_json  # noqa: E402
from benchmarks.regression_workflow import make_data, make_net, train_net  # noqa: E402


# ------------------------------------------------------------------------ timing
def device_gemm_rate(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 5) -> float:
    """Median FLOP/s of ``size``-square ``torch.mm`` in ``dtype`` (TF32 off), after 2 warm-ups."""
    from benchmarks.harness.internals import ieee_float32

    with ieee_float32():
        rate = gemm_rate(size, repeats, dtype, device=device, warmups=2)
    return 2 * size**3 / rate["seconds_median"]


# ------------------------------------------------------------------- workflows
def trained(n: int, n_test: int, device: torch.device, steps: int, seed: int) -> tuple[nn.Module, dict, float]:
    """Data and the MLP trained full-batch on ``device`` (δ = 1 weight decay); returns σ² = train MSE."""
    data = {k: v.to(device) for k, v in make_data(n, n_test).items()}
    torch.manual_seed(seed)
    net = make_net().to(device)
    rmse = train_net(net, data["x"], data["y"], 1.0, steps)
    return net, data, rmse**2


def latent_predictive(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The GP's latent mean and variance at ``x`` in float64 (the model is left in eval mode)."""
    model.eval()
    with torch.no_grad():
        f = model(x)
        return f.mean.double(), f.variance.double()


def exact_workflow(net: nn.Module, data: dict, noise: float, device: torch.device) -> dict[str, Any]:
    """Build (kernel solver), log evidence, latent predictive at the test points."""
    import gpytorch

    import ntkgp

    clock = DeviceClock(device)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(device=device, dtype=data["x"].dtype)
    likelihood.noise = noise
    model = ntkgp.LinearizedGP(net, likelihood, data["x"], data["y"], prior_precision=1.0, solver="kernel")
    _ = model.solver
    clock.mark("build")
    with torch.no_grad():
        lml = float(model.log_evidence())
    clock.mark("lml")
    mean, var = latent_predictive(model, data["x_test"])
    clock.mark("predict")
    return {"time": clock.times, "lml": lml, "mean": mean.cpu(), "var": var.cpu()}


def peer_workflow(net: nn.Module, data: dict, noise: float, device: torch.device) -> dict[str, Any]:
    """laplace-torch FunctionalLaplace with n_subset = N (see ``regression_workflow.py``)."""
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    n = data["x"].shape[0]
    clock = DeviceClock(device)
    la = Laplace(
        net,
        "regression",
        subset_of_weights="all",
        hessian_structure="gp",
        n_subset=n,
        sigma_noise=math.sqrt(noise),
        prior_precision=1.0,
    )
    num_params = sum(p.numel() for p in net.parameters())
    la.fit(DataLoader(TensorDataset(data["x"], data["y"][:, None]), batch_size=max(1, 2**25 // num_params)))
    clock.mark("build")
    with torch.no_grad():
        lml = float(la.log_marginal_likelihood())
    clock.mark("lml")
    mean, var = la(data["x_test"], pred_type="gp")
    clock.mark("predict")
    return {"time": clock.times, "lml": lml, "var": var.detach().reshape(-1).double().cpu()}


def gram_flops(net: nn.Module, n: int) -> float:
    """GEMM flops of the symmetric structured Gram of the MLP's linear layers (see the docstring)."""
    from benchmarks.harness.internals import symmetric_gram_blocks

    blocks = symmetric_gram_blocks(n, 1)
    computed = sum((e1 - s1) * (e2 - s2) for s1, e1, s2, e2 in blocks) / (n * n)
    per_pair = sum(2 * (m.in_features + 1 + m.out_features) for m in net.modules() if isinstance(m, nn.Linear))
    return per_pair * n * n * computed


def time_gram(net: nn.Module, x: Tensor, device: torch.device) -> float:
    """Seconds for the structured NTK Gram (factors and GEMMs, float64 accumulation)."""
    from benchmarks.harness.internals import make_ntk, ntk_gram

    gc.collect()
    ntk = make_ntk(net, x.shape[1:], x, budget=2**30)
    ntk.plan()  # the structured plan is found once per network, outside the timed region
    clock = DeviceClock(device)
    gram = ntk_gram(ntk, x)
    clock.mark("gram")
    del gram
    return clock.times["gram"]


def part_exact(args: argparse.Namespace, device: torch.device, rates: dict) -> list[dict]:
    rows = []
    for n in args.exact_n:
        net, data, noise = trained(n, 500, device, args.train_steps, args.seed)
        small = {k: v[:64] for k, v in data.items()}
        exact_workflow(copy.deepcopy(net), small, noise, device)  # warm-up, untimed
        runs, mems = [], []
        for _ in range(args.repeats):
            with PeakMemory(device) as mem:
                runs.append(exact_workflow(net, data, noise, device))
            mems.append(mem.peak)
        gram_times = [time_gram(net, data["x"], device) for _ in range(args.repeats)]
        gc.collect()
        double_net = copy.deepcopy(net).double()
        truth = exact_workflow(double_net, {k: v.double() for k, v in data.items()}, noise, device)
        var_t = truth["var"]
        row = {
            "n": n,
            "time_median": statistics.median(r["time"]["total"] for r in runs),
            "phase_median": {k: statistics.median(r["time"][k] for r in runs) for k in ("build", "lml", "predict")},
            "times": [r["time"]["total"] for r in runs],
            "peak_bytes": statistics.median(mems),
            "var_err": max(float((r["var"] - var_t).abs().max() / var_t.abs().max()) for r in runs),
            "lml": runs[0]["lml"],
            "lml_truth": truth["lml"],
            "truth_time": truth["time"]["total"],
            "gram_seconds": statistics.median(gram_times),
            "gram_flops": gram_flops(net, n),
        }
        row["gram_rate"] = row["gram_flops"] / row["gram_seconds"]
        row["gram_fraction_fp64"] = row["gram_rate"] / rates["float64"]
        row["cholesky_fraction_fp64"] = (n**3 / 3) / row["phase_median"]["lml"] / rates["float64"]
        if args.peer:
            peer_workflow(copy.deepcopy(net), small, noise, device)
            try:
                with PeakMemory(device) as mem:
                    peer = peer_workflow(net, data, noise, device)
            except torch.OutOfMemoryError as err:  # FunctionalLaplace's predictive solve at large N
                row["peer_error"] = str(err).split(".")[0]
            else:
                row["peer_time"] = peer["time"]["total"]
                row["peer_phases"] = peer["time"]
                row["peer_peak_bytes"] = mem.peak
                row["peer_var_err"] = float((peer["var"] - var_t).abs().max() / var_t.abs().max())
                row["ratio"] = row["time_median"] / row["peer_time"]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in row.items()}, default=float), flush=True)
        rows.append(row)
        del net, data, double_net, truth, runs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def fitted_workflow(
    net: nn.Module, data: dict, noise: float, device: torch.device, spec: Any, optimizer: str, steps: int, lr: float
) -> dict[str, Any]:
    """Build with ``spec``, evidence, fit δ and σ² (Adam or L-BFGS), predict; NLL on the test set."""
    import gpytorch

    import ntkgp

    clock = DeviceClock(device)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(device=device, dtype=data["x"].dtype)
    likelihood.noise = noise
    model = ntkgp.LinearizedGP(net, likelihood, data["x"], data["y"], prior_precision=1.0, solver=spec)
    _ = model.solver
    clock.mark("build")
    with torch.no_grad():
        lml_start = float(model.log_evidence())
    clock.mark("lml")
    fit_evidence(model, optimizer, steps, lr)
    clock.mark("fit")
    mean, var = latent_predictive(model, data["x_test"])
    clock.mark("predict")
    noise_fit = float(likelihood.noise.detach())
    return {
        "time": clock.times,
        "lml_start": lml_start,
        "noise": noise_fit,
        "delta": float(model.prior_precision.detach().reshape(-1)[0]),
        "nll": gaussian_nll(mean.cpu(), var.cpu(), noise_fit, data["y_test"].cpu()),
    }


def part_large(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import ntkgp

    t0 = time.perf_counter()
    net, data, noise = trained(args.large_n, 1000, device, args.train_steps, args.seed)
    out: dict[str, Any] = {"n": args.large_n, "train_seconds": time.perf_counter() - t0, "rows": []}
    idx = torch.randperm(args.large_n, generator=torch.Generator().manual_seed(args.seed))[: args.ref_subset]
    sub = {**data, "x": data["x"][idx.to(device)], "y": data["y"][idx.to(device)]}
    with PeakMemory(device) as mem:
        ref = fitted_workflow(net, sub, noise, device, "kernel", "lbfgs", args.ref_iters, 1.0)
    ref["peak_bytes"] = mem.peak
    out["reference"] = ref
    print(json.dumps({"reference": ref}, default=float), flush=True)
    for m in args.large_m:
        spec = ntkgp.solvers.Inducing(
            num_inducing=m, selection="kmeans", mean="network", generator=torch.Generator().manual_seed(args.seed)
        )
        with PeakMemory(device) as mem:
            row = fitted_workflow(net, data, noise, device, spec, "adam", args.fit_steps, args.fit_lr)
        row.update(m=m, peak_bytes=mem.peak, nll_gap=row["nll"] - ref["nll"])
        print(json.dumps(row, default=float), flush=True)
        out["rows"].append(row)
    return out


# ---------------------------------------------------------------------- reporting
def tables(result: dict[str, Any]) -> str:
    lines = []
    if result.get("exact"):
        lines += [
            "| N | ntkgp time (s) | build / lml / predict (s) | peak mem (GiB) | var err vs f64 "
            "| Gram (s) | Gram fraction of fp64 GEMM | Cholesky fraction of fp64 GEMM | peer time (s) "
            "| ntkgp/peer | peer var err |",
            "|" + "---|" * 11,
        ]
        for r in result["exact"]:
            p = r["phase_median"]
            lines.append(
                f"| {r['n']} | {r['time_median']:.2f} | {p['build']:.2f} / {p['lml']:.2f} / {p['predict']:.2f} "
                f"| {r['peak_bytes'] / GiB:.2f} | {r['var_err']:.1e} | {r['gram_seconds']:.3f} "
                f"| {r['gram_fraction_fp64']:.2f} | {r['cholesky_fraction_fp64']:.2f} "
                f"| {r.get('peer_time', float('nan')):.2f} | {r.get('ratio', float('nan')):.3f} "
                f"| {r.get('peer_var_err', float('nan')):.1e} |"
            )
    if result.get("large"):
        big = result["large"]
        ref = big["reference"]
        lines += [
            "",
            f"N = {big['n']}: reference exact GP on {ref.get('subset', '')} subset: NLL {ref['nll']:.4f}, "
            f"{ref['time']['total']:.1f} s",
            "| M | total (s) | build / lml / fit / predict (s) | peak mem (GiB) | NLL | NLL - ref |",
            "|---|---|---|---|---|---|",
        ]
        for r in big["rows"]:
            t = r["time"]
            lines.append(
                f"| {r['m']} | {t['total']:.1f} | {t['build']:.1f} / {t['lml']:.2f} / {t['fit']:.1f} / "
                f"{t['predict']:.2f} | {r['peak_bytes'] / GiB:.2f} | {r['nll']:.4f} | {r['nll_gap']:+.4f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", nargs="+", default=["peak", "exact", "large"], choices=["peak", "exact", "large"])
    parser.add_argument("--exact-n", type=int, nargs="+", default=[4000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", action="store_true", help="also run laplace-torch FunctionalLaplace")
    parser.add_argument("--large-n", type=int, default=200000)
    parser.add_argument("--large-m", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--ref-subset", type=int, default=20000)
    parser.add_argument("--ref-iters", type=int, default=15)
    parser.add_argument("--fit-steps", type=int, default=20)
    parser.add_argument("--fit-lr", type=float, default=0.05)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["machine"].update(gpu=props.name, gpu_memory_gib=props.total_memory / GiB, cuda=torch.version.cuda)
    rates = {"float64": float("nan"), "float32_ieee": float("nan")}
    if "peak" in args.parts:
        rates = {
            "float64": device_gemm_rate(device, torch.float64),
            "float32_ieee": device_gemm_rate(device, torch.float32),
        }
        print(json.dumps({"gemm_tflops": {k: v / 1e12 for k, v in rates.items()}}), flush=True)
    result["gemm_rates"] = rates
    if "exact" in args.parts:
        result["exact"] = part_exact(args, device, rates)
    if "large" in args.parts:
        result["large"] = part_large(args, device)
        result["large"]["reference"]["subset"] = args.ref_subset
    print(tables(result))
    write_json(result, args.json, indent=1, default=float, announce=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
