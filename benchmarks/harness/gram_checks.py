"""Shared parts of the NTK Gram benchmarks (``kernel_build.py``, ``cnn_digits.py``).

Their command-line options, the machine line they print, the structured-versus-generic
agreement check and the Markdown rows of route times and agreement.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.harness.machine import loadavg, machine_info
from benchmarks.harness.report import fmt_mib, max_rel_err


def start_gram_run(threads: int) -> dict[str, Any]:
    """Set torch's threads (0: leave the default), describe the machine and print it.

    Parameters
    ----------
    threads : int
        Torch threads; 0 leaves torch's default.

    Returns
    -------
    dict
        :func:`~benchmarks.harness.machine.machine_info` without inter-op threads and library versions.
    """
    if threads:
        torch.set_num_threads(threads)
    info = machine_info(interop_threads=False, versions=())
    print(
        f"# machine: {info['cpu_model']}, {info['usable_cores']} usable cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), load {info['loadavg_at_start']}",
        flush=True,
    )
    return info


def finish_gram_run(result: dict[str, Any]) -> dict[str, Any]:
    """Record the load average at the end as ``result["machine"]["loadavg_at_end"]``.

    Parameters
    ----------
    result : dict
        With ``machine`` (from :func:`start_gram_run`).

    Returns
    -------
    dict
        ``result``.
    """
    result["machine"]["loadavg_at_end"] = loadavg()
    return result


def gram_agreement(net: nn.Module, input_shape: tuple[int, ...], x: Tensor, budget: int) -> dict[str, float]:
    """Structured vs generic NTK Gram in float32, and each against a float64 copy of the network.

    Parameters
    ----------
    net : nn.Module
        The (float32) network.
    input_shape : tuple of int
        Shape of one input.
    x : Tensor
        The ``n`` points, as the network takes them.
    budget : int
        Bytes for Jacobian blocks.

    Returns
    -------
    dict
        ``n`` and :func:`~benchmarks.harness.report.max_rel_err` of structured vs generic (float32,
        float64) and of each float32 Gram against the float64 generic one.
    """
    from benchmarks.harness.internals import make_ntk, ntk_gram

    k_fast = ntk_gram(make_ntk(net, input_shape, x, budget=budget), x)
    k_slow = ntk_gram(make_ntk(net, input_shape, x, structured=False, budget=budget), x)
    net64, x64 = copy.deepcopy(net).double(), x.double()
    k64_slow = ntk_gram(make_ntk(net64, input_shape, x64, structured=False, budget=budget), x64)
    k64_fast = ntk_gram(make_ntk(net64, input_shape, x64, budget=budget), x64)
    return {
        "n": x.shape[0],
        "structured_vs_generic_float32": max_rel_err(k_fast, k_slow),
        "structured_float32_vs_float64": max_rel_err(k_fast, k64_slow),
        "generic_float32_vs_float64": max_rel_err(k_slow, k64_slow),
        "structured_vs_generic_float64": max_rel_err(k64_fast, k64_slow),
    }


def route_table(result: dict[str, Any], digits: int) -> list[str]:
    """Markdown rows of the structured route's and (if run) the generic route's times and memory.

    Parameters
    ----------
    result : dict
        With ``structured`` and optionally ``generic`` and ``speedup``.
    digits : int
        Decimals of the structured route's median time.

    Returns
    -------
    list of str
        Header, separator and one row per route.
    """
    s = result["structured"]
    lines = [
        "| route | median time (s) | runs | speed-up | peak memory added (MiB) |",
        "|---|---:|---:|---:|---:|",
        f"| structured (ntkgp) | {s['median']:.{digits}f} | {len(s['seconds'])} | 1.0x | {fmt_mib(s['peak_mib'])} |",
    ]
    if "generic" in result:
        g = result["generic"]
        lines.append(
            f"| generic vmap(jacrev) | {g['median']:.2f} | {len(g['seconds'])} | "
            f"(structured is **{result['speedup']:.1f}x** faster) | {fmt_mib(g['peak_mib'])} |"
        )
    return lines


def agreement_table(result: dict[str, Any]) -> list[str]:
    """Markdown rows of :func:`gram_agreement`'s figures (after a blank line), if ``result`` has them.

    Parameters
    ----------
    result : dict
        Optionally with ``agreement``.

    Returns
    -------
    list of str
        Empty without ``agreement``.
    """
    if "agreement" not in result:
        return []
    a = result["agreement"]
    return [
        "",
        f"| agreement at N = {a['n']} (max abs difference / max abs entry) | value |",
        "|---|---:|",
        f"| structured vs generic, float32 | {a['structured_vs_generic_float32']:.1e} |",
        f"| structured float32 vs float64 reference | {a['structured_float32_vs_float64']:.1e} |",
        f"| generic float32 vs float64 reference | {a['generic_float32_vs_float64']:.1e} |",
        f"| structured vs generic, float64 network | {a['structured_vs_generic_float64']:.1e} |",
    ]


def add_gram_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--skip-generic``, ``--threads``, ``--seed`` and ``--json``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The script's parser.
    """
    parser.add_argument("--skip-generic", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default="", help="write the results to this JSON file")
