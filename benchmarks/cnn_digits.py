r"""Benchmark: the NTK Gram of a small CNN on 8x8 digits, structured (ntkgp) versus generic contraction.

Setup
-----
scikit-learn's ``load_digits`` (1,797 images, pixel values / 16), shuffled with ``--seed``; the first
``N = 1000`` (``--n``) images, as ``1 x 8 x 8`` inputs, ``C = 10`` outputs (class logits). The CNN,
float32, eval mode::

    Conv2d(1, 48, 3, padding=1) - tanh - Conv2d(48, 96, 3, padding=1) - tanh - Flatten - Linear(6144, 10)

(P = 103,498), trained briefly (``--train-steps`` full-batch Adam steps on cross-entropy over the
N images) so that its cotangents are those of a fitted network. What is measured is the Gram.

What is timed
-------------
The ``(N*C) x (N*C)`` NTK Gram (one parameter group, float64 output) by ``ntkgp.gram.ntk_gram``:

* **structured**: ``FunctionalNetwork(net, (1, 8, 8))``: both convs and the linear layer from
  their factors (conv: unfolded patches and per-position cotangents; the route per conv layer,
  per-example weight gradients or the spatial double sum, is picked by ``conv_route_costs``);
* **generic**: ``FunctionalNetwork(net, (1, 8, 8), structured=False)``: ``vmap(jacrev)``
  per-example Jacobians in blocks, contracted block by block.

Same ``--budget`` for both; one warm-up on 32 images each, then ``--repeats`` /
``--generic-repeats`` timed runs (wall clock, one process); medians are reported. The per-layer
table gives each parameter tensor's size, its structured route and the estimated Gram flops of
both routes (``conv_route_costs``; generic: :math:`N^2 C^2 p` with symmetry), which explain the
speed-up: the exact conv weight Gram still costs :math:`\approx C^2 d_{out} d_{in} k^2` per pair of
points, while the linear layer drops from :math:`C^2 d_{in} d_{out}` to about :math:`d_{in} + C^2 d_{out}`.

Agreement: ``max |K_structured - K_generic| / max |K_generic|`` at ``--check-n`` images, in float32
and on a float64 copy of the network.

Usage::

    .venv/bin/python benchmarks/cnn_digits.py --n 100 --generic-repeats 1 --train-steps 20    # quick
    flock /tmp/ntkgp-bench.lock .venv/bin/python benchmarks/cnn_digits.py --json /tmp/bench/cnn_digits.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernel_build import _load, gemm_rate, machine_info, rel_err, time_calls, timed_with_peak  # noqa: E402

from ntkgp import FunctionalNetwork  # noqa: E402
from ntkgp.functional import conv_patches  # noqa: E402
from ntkgp.gram import conv_route_costs, ntk_gram  # noqa: E402
from ntkgp.parameter_groups import parameter_groups  # noqa: E402

SHAPE = (1, 8, 8)


def load_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` digits after a seeded shuffle: inputs ``(n, 64)`` in [0, 1], labels ``(n,)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(seed))[:n]
    x = torch.tensor(digits.data, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)[order]
    return x, y


def make_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 48, 3, padding=1), nn.Tanh(),
        nn.Conv2d(48, 96, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(96 * 8 * 8, 10),
    )


def train(net: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float = 2e-3) -> float:
    """Full-batch Adam on cross-entropy; returns the training accuracy."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    images = x.reshape(-1, *SHAPE)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(images), y)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return float((net(images).argmax(-1) == y).float().mean())


def layer_table(network: FunctionalNetwork, net: nn.Module, x: Tensor) -> list[dict[str, Any]]:
    """Per structured layer: parameters, route and estimated Gram flops (structured vs generic, symmetric)."""
    n, C = x.shape[0], network.num_outputs
    modules = dict(net.named_modules())
    rows = []
    for layer in network.structured_layers:
        m = modules[layer.name]
        p = sum(t.numel() for t in m.parameters())
        generic = float(n * n * C * C * p)  # half of 2 N^2 C^2 p, by symmetry
        if layer.kind == "linear":
            d_in, d_out = m.in_features, m.out_features
            structured = float(2 * n * n * d_in + 2 * (n * C) ** 2 * d_out)
            route, shape = "linear factors", f"{d_in} -> {d_out}"
        else:
            patches = conv_patches(m, torch.zeros(1, m.in_channels, *_input_hw(net, layer.name)))
            L, t = patches.shape[1], patches.shape[2]
            costs = conv_route_costs(L, t, m.out_channels, C, n, n, symmetric=True)
            route = min(costs, key=costs.__getitem__)
            structured = costs[route] + float((n * C) ** 2 * m.out_channels)  # + the bias Gram
            shape = f"L = {L}, d_in k = {t}, d_out = {m.out_channels}"
        rows.append({"layer": layer.name, "kind": layer.kind, "shape": shape, "params": p, "route": route,
                     "structured_gflop_est": structured / 1e9, "generic_gflop_est": generic / 1e9})
    return rows


def _input_hw(net: nn.Module, name: str) -> tuple[int, ...]:
    """Spatial size of the input of submodule ``name`` for one 8x8 image."""
    seen: dict[str, tuple[int, ...]] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        seen["hw"] = tuple(inputs[0].shape[2:])

    handle = dict(net.named_modules())[name].register_forward_hook(hook)
    with torch.no_grad():
        net(torch.zeros(1, *SHAPE))
    handle.remove()
    return seen["hw"]


def agreement(net: nn.Module, x: Tensor, budget: int) -> dict[str, float]:
    groups = parameter_groups(FunctionalNetwork(net, SHAPE).names, 1.0)
    k_fast = ntk_gram(FunctionalNetwork(net, SHAPE), groups, x, budget=budget)
    k_slow = ntk_gram(FunctionalNetwork(net, SHAPE, structured=False), groups, x, budget=budget)
    net64 = copy.deepcopy(net).double()
    k64_fast = ntk_gram(FunctionalNetwork(net64, SHAPE), groups, x.double(), budget=budget)
    k64_slow = ntk_gram(FunctionalNetwork(net64, SHAPE, structured=False), groups, x.double(), budget=budget)
    return {
        "n": x.shape[0],
        "structured_vs_generic_float32": rel_err(k_fast, k_slow),
        "structured_float32_vs_float64": rel_err(k_fast, k64_slow),
        "generic_float32_vs_float64": rel_err(k_slow, k64_slow),
        "structured_vs_generic_float64": rel_err(k64_fast, k64_slow),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"# machine: {info['cpu_model']}, {info['usable_cores']} usable cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), load {info['loadavg_at_start']}", flush=True)
    rate = gemm_rate()
    print(f"# float32 GEMM rate (torch.mm 4096^2, median of 5): {rate['gflops']:.1f} GFLOP/s", flush=True)
    x, y = load_data(args.n, args.seed)
    net = make_cnn(args.seed)
    accuracy = train(net, x, y, args.train_steps)
    fast = FunctionalNetwork(net, SHAPE)
    slow = FunctionalNetwork(net, SHAPE, structured=False)
    groups = parameter_groups(fast.names, 1.0)
    C, P = fast.num_outputs, fast.num_parameters
    print(f"# CNN P = {P:,}, N = {args.n}, C = {C}, train accuracy {accuracy:.3f}, "
          f"budget {args.budget / 2**20:.0f} MiB", flush=True)
    table = layer_table(fast, net, x)

    def build(network: FunctionalNetwork, points: Tensor) -> Tensor:
        return ntk_gram(network, groups, points, budget=args.budget)

    build(fast, x[:32])
    fast_times, fast_mib = timed_with_peak(lambda: build(fast, x), args.repeats)
    factor_times = time_calls(lambda: fast.structured_factors(x), args.repeats)
    fast_median = statistics.median(fast_times)
    print(f"structured: median {fast_median:.3f} s of {[round(t, 3) for t in fast_times]}", flush=True)
    result: dict[str, Any] = {
        "benchmark": "cnn_digits", "machine": info, "gemm_rate": rate, "args": vars(args),
        "problem": {"network": "Conv2d(1,48,3,p=1)-tanh-Conv2d(48,96,3,p=1)-tanh-Linear(6144,10)",
                    "P": P, "C": C, "N": args.n, "dtype": "float32", "budget_bytes": args.budget,
                    "train_accuracy": accuracy},
        "layers": table,
        "structured": {"seconds": fast_times, "median": fast_median, "peak_mib": fast_mib,
                       "factor_pass_median": statistics.median(factor_times)},
    }
    if not args.skip_generic:
        build(slow, x[:32])
        slow_times, slow_mib = timed_with_peak(lambda: build(slow, x), args.generic_repeats)
        slow_median = statistics.median(slow_times)
        print(f"generic: median {slow_median:.3f} s of {[round(t, 3) for t in slow_times]}", flush=True)
        result["generic"] = {"seconds": slow_times, "median": slow_median, "peak_mib": slow_mib}
        result["speedup"] = slow_median / fast_median
    if args.check_n:
        result["agreement"] = agreement(net, x[: args.check_n], args.budget)
        print(f"agreement at N = {args.check_n}: {result['agreement']}", flush=True)
    result["machine"]["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def markdown(result: dict[str, Any]) -> str:
    prob, s, rate = result["problem"], result["structured"], result["gemm_rate"]
    def mib(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.0f}"

    lines = [
        f"**NTK Gram build, CNN on 8x8 digits**: {prob['network']}, P = {prob['P']:,}, N = {prob['N']}, "
        f"C = {prob['C']}, float32, budget {prob['budget_bytes'] / 2**20:.0f} MiB; "
        f"{result['machine']['cpu_model']}, {result['machine']['torch_threads']} threads; "
        f"float32 GEMM rate {rate['gflops']:.1f} GFLOP/s; load average {_load(result['machine'])}",
        "",
        "| route | median time (s) | runs | speed-up | peak memory added (MiB) |",
        "|---|---:|---:|---:|---:|",
        f"| structured (ntkgp) | {s['median']:.2f} | {len(s['seconds'])} | 1.0x | {mib(s['peak_mib'])} |",
    ]
    if "generic" in result:
        g = result["generic"]
        lines.append(f"| generic vmap(jacrev) | {g['median']:.2f} | {len(g['seconds'])} | "
                     f"(structured is **{result['speedup']:.1f}x** faster) | {mib(g['peak_mib'])} |")
    lines += ["", f"Structured factor pass: {s['factor_pass_median']:.3f} s (median).", "",
              "| layer | kind | shape | params | structured route | est. GFLOP structured | est. GFLOP generic |",
              "|---|---|---|---:|---|---:|---:|"]
    for r in result["layers"]:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['shape']} | {r['params']:,} | {r['route']} | "
                     f"{r['structured_gflop_est']:.1f} | {r['generic_gflop_est']:.1f} |")
    if "agreement" in result:
        a = result["agreement"]
        lines += [
            "",
            f"| agreement at N = {a['n']} (max abs difference / max abs entry) | value |",
            "|---|---:|",
            f"| structured vs generic, float32 | {a['structured_vs_generic_float32']:.1e} |",
            f"| structured float32 vs float64 reference | {a['structured_float32_vs_float64']:.1e} |",
            f"| generic float32 vs float64 reference | {a['generic_float32_vs_float64']:.1e} |",
            f"| structured vs generic, float64 network | {a['structured_vs_generic_float64']:.1e} |",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the structured build")
    parser.add_argument("--generic-repeats", type=int, default=3, help="timed runs of the generic build")
    parser.add_argument("--budget", type=int, default=2**30, help="bytes for Jacobian blocks (both routes)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--check-n", type=int, default=100, help="images for the agreement check (0: skip)")
    parser.add_argument("--skip-generic", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default="", help="write the results to this JSON file")
    args = parser.parse_args()
    result = run(args)
    print()
    print(markdown(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
