r"""Benchmark: building the NTK Gram matrix alone, structured (ntkgp) versus generic Jacobian contraction.

What is timed
-------------
The ``(N*C) x (N*C)`` NTK Gram :math:`K = J(X) J(X)^\top` (one parameter group, float64 output) of
an MLP ``d_in -> width -> ... -> width -> 1`` with ``depth`` tanh hidden layers, in float32
(defaults: ``d_in = 8``, ``width = 512``, ``depth = 3``, ``P = 530,433``; ``N = 4000`` inputs drawn
from a standard normal), built by ``ntkgp.ntk.gram`` on

* **structured**: ``Implementation.STRUCTURED``: every ``nn.Linear`` by its factors,
  :math:`K_W = (A A^\top) \circ (G G^\top)`, :math:`K_b = G G^\top` (one forward pass with zero
  probes and one backward pass per output, then two GEMMs per layer);
* **generic**: ``Implementation.GENERIC``: per-example Jacobians by
  ``vmap(jacrev)`` in blocks, contracted block by block (exploiting symmetry).

Both get the same ``--budget`` (bytes for Jacobian blocks; the generic route holds two blocks of
``budget / 2``; the structured route needs no Jacobian blocks at all). Each is warmed up once on
64 points, then timed ``--repeats`` / ``--generic-repeats`` times (``time.perf_counter``, wall
clock, one process); the tables show medians.

GEMM efficiency
---------------
The machine's matmul rates are measured first: median time of ``torch.mm`` of two ``4096 x 4096``
matrices (``2 * 4096**3`` flops), in float32 and in float64. ntkgp runs the ``nn.Linear`` factor
products in float64 even for a float32 network (``gram._linear_grams``: cheap, and they set the
accuracy of the GP's predictive variances), so the float64 rate is their ceiling; the float32
rate is reported alongside. The structured route's GEMM work is counted analytically: per linear
layer, :math:`2N^2 d_{in}` for :math:`AA^\top` plus :math:`2(NC)^2 d_{out}` for :math:`GG^\top`
(the bias shares :math:`GG^\top`). Reported:

* that count over the time of just those full GEMMs on the same factors (float64 ``torch.mm``,
  one per product), as a fraction of the measured matmul rates;
* the flops the build actually executes over the whole build time (factor pass, GEMMs and
  float64 accumulation included). For a symmetric Gram ntkgp computes only the lower block
  triangle (4 row blocks: 62.5% of the full products) and mirrors it, and fuses each bias into
  its weight's GEMM (``[A, 1]``, ``d_in + 1`` columns);
* the full-product count over the whole build time, an "effective" rate that can exceed the
  GEMM rate because of the symmetry.

Agreement
---------
At ``--check-n`` points: ``max |K_structured - K_generic| / max |K_generic|`` in float32, and each
float32 Gram against the float64 Gram of a float64 copy of the network (generic route).

Peak memory: per route, the peak resident memory the build added (``VmHWM`` after reset by
``/proc/self/clear_refs``, minus the RSS before), when the kernel allows the reset.

Usage::

    .venv/bin/python benchmarks/kernel_build.py --n 500 --generic-repeats 1      # quick
    flock /tmp/ntkgp-bench.lock .venv/bin/python benchmarks/kernel_build.py --json /tmp/bench/kernel_build.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    MiB,
    add_gram_run_arguments,
    agreement_table,
    finish_gram_run,
    fmt_load,
    gemm_rate,
    gram_agreement,
    print_and_save,
    route_table,
    start_gram_run,
    time_calls,
    timed_route,
)
from benchmarks.harness.internals import (  # noqa: E402
    EmpiricalNTK,
    make_ntk,
    ntk_gram,
    structured_factors,
    symmetric_gram_blocks,
)


# ---------------------------------------------------------------------- problem
def make_net(d_in: int, width: int, depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers).eval()


def structured_gemm_flops(net: nn.Module, n: int, outputs: int) -> float:
    """Analytic GEMM flops of the structured Gram: per Linear, 2 N^2 d_in + 2 (N C)^2 d_out."""
    return float(
        sum(
            2 * n * n * m.in_features + 2 * (n * outputs) ** 2 * m.out_features
            for m in net.modules()
            if isinstance(m, nn.Linear)
        )
    )


def executed_gemm_flops(net: nn.Module, n: int, outputs: int) -> float:
    """GEMM flops the structured build actually runs for a symmetric Gram (x2 = x1).

    ntkgp forms only the lower block triangle (``symmetric_gram_blocks``) and mirrors it, and
    fuses each bias into its weight's input Gram (``A~ = [A, 1]``: ``d_in + 1``).
    """
    total = 0.0
    for m in net.modules():
        if isinstance(m, nn.Linear):
            k_in = m.in_features + (m.bias is not None)
            for s1, e1, s2, e2 in symmetric_gram_blocks(n, outputs):
                r1, r2 = e1 - s1, e2 - s2
                total += 2.0 * r1 * r2 * k_in + 2.0 * (r1 * outputs) * (r2 * outputs) * m.out_features
    return total


def gemms_only(ntk: EmpiricalNTK, x: Tensor, repeats: int) -> list[float]:
    """Time just the structured route's GEMMs (A A^T and G G^T per layer) on precomputed captures,
    in float64 as ntkgp runs them (``structured.linear.linear_grams`` casts them to float64)."""
    factors = [(c.inputs[:, 0].double(), c.cotangents[:, :, 0].double()) for c in structured_factors(ntk, x)]

    def run() -> None:
        for a, g in factors:
            a @ a.T
            flat = g.reshape(-1, g.shape[-1])
            flat @ flat.T

    run()
    return time_calls(run, repeats)


def agreement(net: nn.Module, d_in: int, n: int, budget: int, seed: int) -> dict[str, float]:
    """Structured vs generic in float32, and each against a float64 (generic) reference, at n points."""
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed + 1))
    return gram_agreement(net, (d_in,), x, budget)


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    info = start_gram_run(args.threads)
    rate = gemm_rate()
    rate64 = gemm_rate(dtype=torch.float64)
    print(
        f"# GEMM rate (torch.mm 4096^2, median of 5): float32 {rate['gflops']:.1f} GFLOP/s, "
        f"float64 {rate64['gflops']:.1f} GFLOP/s",
        flush=True,
    )

    net = make_net(args.d_in, args.width, args.depth, args.seed)
    x = torch.randn(args.n, args.d_in, generator=torch.Generator().manual_seed(args.seed))
    fast = make_ntk(net, (args.d_in,), x, budget=args.budget)
    slow = make_ntk(net, (args.d_in,), x, structured=False, budget=args.budget)
    C, P = fast.num_outputs, fast.network.num_parameters
    print(
        f"# MLP {args.d_in}-{'-'.join([str(args.width)] * args.depth)}-1 tanh, float32, P = {P:,}, "
        f"N = {args.n}, C = {C}, budget = {args.budget / MiB:.0f} MiB",
        flush=True,
    )

    def build(ntk: EmpiricalNTK, points: Tensor) -> Tensor:
        return ntk_gram(ntk, points)

    warm = x[:64]
    build(fast, warm)
    structured = timed_route("structured", lambda: build(fast, x), args.repeats)
    factor_times = time_calls(lambda: structured_factors(fast, x), args.repeats)
    gemm_times = gemms_only(fast, x, args.repeats)
    flops = structured_gemm_flops(net, args.n, C)
    executed = executed_gemm_flops(net, args.n, C)
    fast_median = structured["median"]
    gemm_median = statistics.median(gemm_times)
    result: dict[str, Any] = {
        "benchmark": "kernel_build",
        "machine": info,
        "gemm_rate": rate,
        "gemm_rate_float64": rate64,
        "args": vars(args),
        "problem": {
            "network": f"MLP {args.d_in}-{'-'.join([str(args.width)] * args.depth)}-1 tanh",
            "P": P,
            "C": C,
            "N": args.n,
            "dtype": "float32",
            "budget_bytes": args.budget,
        },
        "structured": {
            **structured,
            "factor_pass_median": statistics.median(factor_times),
            "gemm_only_median": gemm_median,
            "gemm_dtype": "float64",
            "gemm_flops": flops,
            "gemm_flops_executed": executed,
            "gflops_full_equivalent_end_to_end": flops / fast_median / 1e9,
            "gflops_executed_end_to_end": executed / fast_median / 1e9,
            "fraction_of_float64_peak_executed_end_to_end": executed / fast_median / 1e9 / rate64["gflops"],
            "fraction_of_float32_peak_executed_end_to_end": executed / fast_median / 1e9 / rate["gflops"],
            "gflops_gemm_only": flops / gemm_median / 1e9,
            "fraction_of_float64_peak_gemm_only": flops / gemm_median / 1e9 / rate64["gflops"],
            "fraction_of_float32_peak_gemm_only": flops / gemm_median / 1e9 / rate["gflops"],
        },
    }
    if not args.skip_generic:
        build(slow, warm)
        result["generic"] = timed_route("generic", lambda: build(slow, x), args.generic_repeats)
        result["speedup"] = result["generic"]["median"] / fast_median
    if args.check_n:
        result["agreement"] = agreement(net, args.d_in, args.check_n, args.budget, args.seed)
        print(f"agreement at N = {args.check_n}: {result['agreement']}", flush=True)
    return finish_gram_run(result)


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    prob, s, rate = result["problem"], result["structured"], result["gemm_rate"]
    lines = [
        f"**NTK Gram build**, {prob['network']}, P = {prob['P']:,}, N = {prob['N']}, C = {prob['C']}, float32, "
        f"budget {prob['budget_bytes'] / MiB:.0f} MiB; {result['machine']['cpu_model']}, "
        f"{result['machine']['torch_threads']} threads; GEMM rate float32 {rate['gflops']:.1f}, float64 "
        f"{result['gemm_rate_float64']['gflops']:.1f} GFLOP/s; "
        f"load average {fmt_load(result['machine'])}",
        "",
        *route_table(result, digits=3),
        "",
        "| structured route | value |",
        "|---|---:|",
        f"| GEMM flops, full products (analytic, 2N²d_in + 2(NC)²d_out per layer) | "
        f"{s['gemm_flops'] / 1e9:.1f} GFLOP |",
        f"| GEMM flops executed (lower block triangle of the symmetric Gram) | "
        f"{s['gemm_flops_executed'] / 1e9:.1f} GFLOP |",
        f"| factor pass (median) | {s['factor_pass_median']:.3f} s |",
        f"| the full GEMMs alone, A Aᵀ and G Gᵀ per layer, float64 (median) | {s['gemm_only_median']:.3f} s |",
        f"| GEMM rate, full GEMMs alone | {s['gflops_gemm_only']:.1f} GFLOP/s "
        f"(**{100 * s['fraction_of_float64_peak_gemm_only']:.0f}%** of the float64 peak, "
        f"{100 * s['fraction_of_float32_peak_gemm_only']:.0f}% of the float32 peak) |",
        f"| GEMM rate, executed flops / whole structured build | {s['gflops_executed_end_to_end']:.1f} GFLOP/s "
        f"(**{100 * s['fraction_of_float64_peak_executed_end_to_end']:.0f}%** of the float64 peak, "
        f"{100 * s['fraction_of_float32_peak_executed_end_to_end']:.0f}% of the float32 peak) |",
        f"| full-product flops / whole structured build (effective) | "
        f"{s['gflops_full_equivalent_end_to_end']:.1f} GFLOP/s |",
    ]
    lines += agreement_table(result)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--d-in", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the structured build")
    parser.add_argument("--generic-repeats", type=int, default=3, help="timed runs of the generic build")
    parser.add_argument("--budget", type=int, default=2**30, help="bytes for Jacobian blocks (both routes)")
    parser.add_argument("--check-n", type=int, default=400, help="points for the agreement check (0: skip)")
    add_gram_run_arguments(parser)
    args = parser.parse_args()
    result = run(args)
    print_and_save(markdown(result), result, args.json)


if __name__ == "__main__":
    main()
