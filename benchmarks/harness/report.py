"""Reports: relative errors and number formats for the tables, JSON files, the run's start and finish."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.harness.machine import machine_info


def max_rel_err(value: Tensor | Sequence[float], truth: Tensor | Sequence[float]) -> float:
    """``max |value - truth| / max |truth|``, in float64.

    Parameters
    ----------
    value, truth : Tensor or sequence of float
        Same shape.

    Returns
    -------
    float
        The relative error.
    """
    v = torch.as_tensor(value, dtype=torch.float64)
    t = torch.as_tensor(truth, dtype=torch.float64)
    return float((v - t).abs().max() / t.abs().max())


def fmt_mib(value: float | None) -> str:
    """A size in MiB without decimals, or ``"n/a"``.

    Parameters
    ----------
    value : float or None
        The size in MiB.

    Returns
    -------
    str
        The formatted value.
    """
    return "n/a" if value is None else f"{value:,.0f}"


def fmt_load(machine: dict[str, Any]) -> str:
    """1-minute load averages at start and end (the machine is shared).

    Parameters
    ----------
    machine : dict
        With ``loadavg_at_start`` and ``loadavg_at_end``.

    Returns
    -------
    str
        ``"<start> (start) / <end> (end)"``, or ``"n/a"``.
    """
    start, end = machine.get("loadavg_at_start"), machine.get("loadavg_at_end")
    return f"{start[0]:.1f} (start) / {end[0]:.1f} (end)" if start and end else "n/a"


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments for a JSON report, with ``json`` (a path or None) as a string.

    Parameters
    ----------
    args : argparse.Namespace
        The script's arguments, with ``json``.

    Returns
    -------
    dict
        ``vars(args)`` with ``json`` replaced by ``str(args.json)``.
    """
    return vars(args) | {"json": str(args.json)}


def run_record(machine: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The first entries of a JSON report: the machine, the load average now and the arguments.

    Parameters
    ----------
    machine : dict
        The machine, e.g. :func:`~benchmarks.harness.machine.machine_summary` at the start.
    args : argparse.Namespace
        The script's arguments, with ``json``.

    Returns
    -------
    dict
        ``machine``, ``load_average_after`` (1, 5 and 15-minute load averages, as a list) and
        ``args`` (:func:`args_record`), in this order.
    """
    return {"machine": machine, "load_average_after": list(os.getloadavg()), "args": args_record(args)}


def command_line() -> str:
    """The command line of this process (``sys.argv`` joined by spaces), for a JSON report."""
    return " ".join(sys.argv)


def write_json(
    data: Any,
    path: str | Path | None,
    *,
    indent: int = 2,
    default: Callable[[Any], Any] | None = None,
    announce: bool = True,
) -> None:
    """Write ``data`` as indented JSON to ``path`` (creating its folder) and print ``wrote <path>``.

    Parameters
    ----------
    data : object
        JSON-serializable (or made so by ``default``).
    path : str or Path, optional
        The file; nothing is written if it is None or empty.
    indent : int, default 2
        Indentation of :func:`json.dumps`.
    default : callable, optional
        :func:`json.dumps`'s ``default``: what objects it cannot serialize become.
    announce : bool, default True
        Print ``wrote <path>``.
    """
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=indent, default=default))
    if announce:
        print(f"wrote {path}")


def print_and_save(text: str, result: dict[str, Any], path: str | Path | None) -> None:
    """Print ``text`` after a blank line; write ``result`` to ``path`` (if given), also after a blank line.

    Parameters
    ----------
    text : str
        The Markdown report.
    result : dict
        What goes to the JSON file.
    path : str or Path, optional
        The JSON file.
    """
    print()
    print(text)
    if path:
        print()
        write_json(result, path)


def start_report(args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Set torch's threads to ``args.threads``, start the clock and print the machine.

    Parameters
    ----------
    args : argparse.Namespace
        The script's arguments, with ``threads``.

    Returns
    -------
    report : dict
        ``machine`` (:func:`~benchmarks.harness.machine.machine_info`) and ``config`` (the arguments).
    started : float
        ``time.perf_counter()`` at the start.
    """
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(), "config": vars(args).copy()}
    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    return report, started


def finish_report(report: dict[str, Any], started: float, path: str | Path | None) -> None:
    """Record and print the wall time and the load average, then write the report (if ``path``).

    Parameters
    ----------
    report : dict
        Gets ``wall_seconds`` and ``loadavg_at_end``.
    started : float
        ``time.perf_counter()`` at the start (see :func:`start_report`).
    path : str or Path, optional
        The JSON file.
    """
    report["wall_seconds"] = time.perf_counter() - started
    report["loadavg_at_end"] = list(os.getloadavg())
    print(f"total wall time {report['wall_seconds']:.1f} s; load average at end {report['loadavg_at_end']}")
    write_json(report, path)
