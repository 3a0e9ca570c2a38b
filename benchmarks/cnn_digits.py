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
The ``(N*C) x (N*C)`` NTK Gram (one parameter group, float64 output) by ``ntkgp.ntk.gram``:

* **structured**: ``Implementation.STRUCTURED``: both convs and the linear layer from
  their factors (conv: unfolded patches and per-position cotangents; the route per conv layer,
  per-example weight gradients or the spatial double sum, is picked by ``conv_route_costs``);
* **generic**: ``Implementation.GENERIC``: ``vmap(jacrev)``
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
    conv_route_costs,
    make_ntk,
    module_patches,
    ntk_gram,
    structured_factors,
    structured_layers,
)

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
        nn.Conv2d(1, 48, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(48, 96, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(96 * 8 * 8, 10),
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


def layer_table(ntk: EmpiricalNTK, net: nn.Module, x: Tensor) -> list[dict[str, Any]]:
    """Per structured layer: parameters, route and estimated Gram flops (structured vs generic, symmetric)."""
    n, C = x.shape[0], ntk.num_outputs
    modules = dict(net.named_modules())
    rows = []
    for name, kind in structured_layers(ntk):
        m = modules[name]
        p = sum(t.numel() for t in m.parameters())
        generic = float(n * n * C * C * p)  # half of 2 N^2 C^2 p, by symmetry
        if kind == "linear":
            d_in, d_out = m.in_features, m.out_features
            structured = float(2 * n * n * d_in + 2 * (n * C) ** 2 * d_out)
            route, shape = "linear factors", f"{d_in} -> {d_out}"
        else:
            patches = module_patches(m, torch.zeros(1, m.in_channels, *_input_hw(net, name)))
            L, t = patches.shape[1], patches.shape[2]
            costs = conv_route_costs(L, t, m.out_channels, C, n, n, symmetric=True)
            route = min(costs, key=costs.__getitem__)
            structured = costs[route] + float((n * C) ** 2 * m.out_channels)  # + the bias Gram
            shape = f"L = {L}, d_in k = {t}, d_out = {m.out_channels}"
        rows.append(
            {
                "layer": name,
                "kind": kind,
                "shape": shape,
                "params": p,
                "route": route,
                "structured_gflop_est": structured / 1e9,
                "generic_gflop_est": generic / 1e9,
            }
        )
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = start_gram_run(args.threads)
    rate = gemm_rate()
    print(f"# float32 GEMM rate (torch.mm 4096^2, median of 5): {rate['gflops']:.1f} GFLOP/s", flush=True)
    x, y = load_data(args.n, args.seed)
    net = make_cnn(args.seed)
    accuracy = train(net, x, y, args.train_steps)
    fast = make_ntk(net, SHAPE, x, budget=args.budget)
    slow = make_ntk(net, SHAPE, x, structured=False, budget=args.budget)
    C, P = fast.num_outputs, fast.network.num_parameters
    print(
        f"# CNN P = {P:,}, N = {args.n}, C = {C}, train accuracy {accuracy:.3f}, budget {args.budget / MiB:.0f} MiB",
        flush=True,
    )
    table = layer_table(fast, net, x)

    def build(ntk: EmpiricalNTK, points: Tensor) -> Tensor:
        return ntk_gram(ntk, points)

    build(fast, x[:32])
    structured = timed_route("structured", lambda: build(fast, x), args.repeats)
    factor_times = time_calls(lambda: structured_factors(fast, x), args.repeats)
    result: dict[str, Any] = {
        "benchmark": "cnn_digits",
        "machine": info,
        "gemm_rate": rate,
        "args": vars(args),
        "problem": {
            "network": "Conv2d(1,48,3,p=1)-tanh-Conv2d(48,96,3,p=1)-tanh-Linear(6144,10)",
            "P": P,
            "C": C,
            "N": args.n,
            "dtype": "float32",
            "budget_bytes": args.budget,
            "train_accuracy": accuracy,
        },
        "layers": table,
        "structured": {**structured, "factor_pass_median": statistics.median(factor_times)},
    }
    if not args.skip_generic:
        build(slow, x[:32])
        result["generic"] = timed_route("generic", lambda: build(slow, x), args.generic_repeats)
        result["speedup"] = result["generic"]["median"] / structured["median"]
    if args.check_n:
        result["agreement"] = gram_agreement(net, SHAPE, x[: args.check_n], args.budget)
        print(f"agreement at N = {args.check_n}: {result['agreement']}", flush=True)
    return finish_gram_run(result)


def markdown(result: dict[str, Any]) -> str:
    prob, s, rate = result["problem"], result["structured"], result["gemm_rate"]
    lines = [
        f"**NTK Gram build, CNN on 8x8 digits**: {prob['network']}, P = {prob['P']:,}, N = {prob['N']}, "
        f"C = {prob['C']}, float32, budget {prob['budget_bytes'] / MiB:.0f} MiB; "
        f"{result['machine']['cpu_model']}, {result['machine']['torch_threads']} threads; "
        f"float32 GEMM rate {rate['gflops']:.1f} GFLOP/s; load average {fmt_load(result['machine'])}",
        "",
        *route_table(result, digits=2),
        "",
        f"Structured factor pass: {s['factor_pass_median']:.3f} s (median).",
        "",
        "| layer | kind | shape | params | structured route | est. GFLOP structured | est. GFLOP generic |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in result["layers"]:
        lines.append(
            f"| {r['layer']} | {r['kind']} | {r['shape']} | {r['params']:,} | {r['route']} | "
            f"{r['structured_gflop_est']:.1f} | {r['generic_gflop_est']:.1f} |"
        )
    lines += agreement_table(result)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the structured build")
    parser.add_argument("--generic-repeats", type=int, default=3, help="timed runs of the generic build")
    parser.add_argument("--budget", type=int, default=2**30, help="bytes for Jacobian blocks (both routes)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--check-n", type=int, default=100, help="images for the agreement check (0: skip)")
    add_gram_run_arguments(parser)
    args = parser.parse_args()
    result = run(args)
    print_and_save(markdown(result), result, args.json)


if __name__ == "__main__":
    main()
