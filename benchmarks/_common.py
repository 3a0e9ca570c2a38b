"""Scaffolding shared by the benchmark scripts in this folder.

What lives here is what several scripts did alike and that is not itself measured: describing
the machine, timing phases and repeated calls, probing peak memory, fitting hyperparameters on
the evidence, and writing the reports. The problems (data, networks, workflows) stay in the
scripts.

The scripts import this module as ``_common``: run as ``python benchmarks/<script>.py``, their
own folder is first on ``sys.path``; scripts that import siblings also put it there
explicitly, which processes started with ``multiprocessing``'s "spawn" inherit.

Sections
--------
* machine: :func:`cpu_model`, :func:`machine_info`, :func:`machine_summary`, :func:`gemm_rate`;
* timing: :class:`PhaseTimer`, :func:`time_calls`, :func:`timed_with_peak`, :func:`timed_route`;
* memory: :func:`status_kib`, :func:`reset_peak_rss`, :class:`PeakRSS`, :func:`peak_memory`;
* evidence: :func:`fit_evidence`;
* NTK Gram benchmarks (``kernel_build.py``, ``cnn_digits.py``): :func:`start_gram_run`,
  :func:`gram_agreement`, :func:`route_table`, :func:`agreement_table`,
  :func:`add_gram_run_arguments`, :func:`print_and_save`;
* reporting: :func:`max_rel_err`, :func:`fmt_mib`, :func:`fmt_load`, :func:`write_json`,
  :func:`start_report`, :func:`finish_report`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: libraries whose versions :func:`machine_info` records by default
LIBRARIES = ("ntkgp", "laplace", "gpytorch", "linear_operator")
#: distribution names of the libraries whose import name differs
_DISTRIBUTIONS = {"laplace": "laplace-torch"}
_KiB = 1024


# ---------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name.

    Returns
    -------
    str
        The first ``model name`` of ``/proc/cpuinfo``, or ``"unknown"``.
    """
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _library_version(name: str) -> str | None:
    """Installed version of the library imported as ``name``, or None."""
    try:
        from importlib.metadata import version

        return version(_DISTRIBUTIONS.get(name, name))
    except Exception:  # noqa: BLE001 - version lookup is best effort
        return None


def machine_info(*, interop_threads: bool = True, versions: Sequence[str] = LIBRARIES) -> dict[str, Any]:
    """CPU model, core counts, library versions and thread settings.

    Parameters
    ----------
    interop_threads : bool, default True
        Also record torch's inter-op threads.
    versions : sequence of str, default :data:`LIBRARIES`
        Libraries (import names) whose installed versions to record.

    Returns
    -------
    dict
        ``cpu_model``, ``logical_cores``, ``usable_cores``, ``python``, ``platform``, ``torch``,
        ``torch_threads``, [``torch_interop_threads``], ``loadavg_at_start`` (1, 5 and 15-minute
        load averages), then one entry per library of ``versions``.
    """
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if interop_threads:
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    info["loadavg_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    for name in versions:
        info[name] = _library_version(name)
    return info


def machine_summary(threads: int, versions: dict[str, str] | None = None) -> dict[str, Any]:
    """CPU model, cores, versions, threads and the current load average.

    Parameters
    ----------
    threads : int
        The torch threads the benchmark runs with.
    versions : dict, optional
        Further library versions, recorded after torch's.

    Returns
    -------
    dict
        ``cpu_model``, ``logical_cores``, ``torch_threads``, ``torch``, the ``versions``,
        ``python``, ``platform`` and ``load_average_1_5_15``.
    """
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        **(versions or {}),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


def gemm_rate(size: int = 4096, repeats: int = 5, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The machine's matmul rate: median over ``repeats`` of ``torch.mm`` on ``size x size`` in ``dtype``.

    Parameters
    ----------
    size : int, default 4096
        Side of the two square matrices.
    repeats : int, default 5
        Timed products, after one untimed warm-up.
    dtype : torch.dtype, default torch.float32
        Their dtype.

    Returns
    -------
    dict
        ``size``, ``seconds_median``, ``gflops`` (at the median) and ``gflops_best`` (at the fastest).
    """
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    times = time_calls(lambda: torch.mm(a, b), repeats)
    median = statistics.median(times)
    return {"size": size, "seconds_median": median, "gflops": 2 * size**3 / median / 1e9,
            "gflops_best": 2 * size**3 / min(times) / 1e9}


# ---------------------------------------------------------------------- timing
class PhaseTimer:
    """Wall-clock seconds (``time.perf_counter``) of consecutive phases and of the whole.

    The clock starts when the timer is made. :meth:`mark` closes a phase; :meth:`skip` lets time
    pass that counts in the total but in no phase; :meth:`stop` closes the last phase and adds
    ``"total"``.

    Attributes
    ----------
    times : dict of str to float
        Seconds per phase, in order, then ``"total"`` once stopped.
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.start = self._lap = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Record the seconds since the previous mark (or the start) as ``phase``.

        Parameters
        ----------
        phase : str
            Name of the phase just ended.
        """
        now = time.perf_counter()
        self.times[phase] = now - self._lap
        self._lap = now

    def skip(self) -> None:
        """Start the next phase now: the time since the previous mark is in no phase, only in the total."""
        self._lap = time.perf_counter()

    def stop(self, phase: str) -> dict[str, float]:
        """Close the last phase and record ``"total"``, the seconds since the start.

        Parameters
        ----------
        phase : str
            Name of the last phase.

        Returns
        -------
        dict of str to float
            :attr:`times`.
        """
        self.mark(phase)
        self.times["total"] = self._lap - self.start
        return self.times


def time_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``.

    Parameters
    ----------
    fn : callable
        Called without arguments; its result is dropped.
    repeats : int
        Number of calls.

    Returns
    -------
    list of float
        Seconds per call.
    """
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timed_with_peak(fn: Callable[[], object], repeats: int) -> tuple[list[float], float | None]:
    """``repeats`` timed calls of ``fn`` (results dropped); the first also measures its peak memory.

    Parameters
    ----------
    fn : callable
        Called without arguments.
    repeats : int
        Number of calls (at least 1).

    Returns
    -------
    times : list of float
        Seconds per call.
    peak_mib : float or None
        Peak RSS the first call added, in MiB (see :func:`peak_memory`).
    """
    start = time.perf_counter()
    _, mib = peak_memory(fn)
    times = [time.perf_counter() - start]
    return times + time_calls(fn, repeats - 1), mib


def timed_route(name: str, fn: Callable[[], object], repeats: int) -> dict[str, Any]:
    """:func:`timed_with_peak`, with the median printed as ``"<name>: median ..."``.

    Parameters
    ----------
    name : str
        Label of the printed line.
    fn : callable
        The build to time, called without arguments.
    repeats : int
        Number of calls.

    Returns
    -------
    dict
        ``seconds`` (per call), ``median`` and ``peak_mib``.
    """
    times, mib = timed_with_peak(fn, repeats)
    median = statistics.median(times)
    print(f"{name}: median {median:.3f} s of {[round(t, 3) for t in times]}", flush=True)
    return {"seconds": times, "median": median, "peak_mib": mib}


# ---------------------------------------------------------------------- memory
def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in KiB.

    Parameters
    ----------
    field : str
        The field's name.

    Returns
    -------
    int
        Its value in KiB.

    Raises
    ------
    RuntimeError
        If the field is missing.
    """
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS.

    Returns
    -------
    bool
        False if ``/proc/self/clear_refs`` cannot be written (the counter is unchanged).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Context manager measuring the peak resident memory added by its body, in bytes.

    On entry it collects garbage, resets the kernel's peak-RSS counter and reads the current RSS;
    on exit the peak minus that baseline is :attr:`peak_delta`. If the counter cannot be reset, the
    peak is ``ru_maxrss`` (the lifetime peak: an upper bound) and :attr:`exact` is False.

    Attributes
    ----------
    exact : bool
        Whether the peak counter was reset.
    baseline_kib : int
        RSS on entry, in KiB.
    peak_delta : int
        Peak RSS added by the body, in bytes (at least 0); set on exit.
    """

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.exact = reset_peak_rss()
        self.baseline_kib = status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            peak_kib = status_kib("VmHWM")
        else:  # ru_maxrss is the lifetime peak, in KiB on Linux: an upper bound
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_delta = max(0, peak_kib - self.baseline_kib) * _KiB


def peak_memory(fn: Callable[[], object]) -> tuple[object, float | None]:
    """Run ``fn``; return its result and the peak RSS it added in MiB.

    Unlike :class:`PeakRSS`, no garbage collection first and no fallback.

    Parameters
    ----------
    fn : callable
        Called without arguments.

    Returns
    -------
    result : object
        What ``fn`` returned.
    peak_mib : float or None
        Peak RSS added, in MiB; None if the peak counter cannot be reset.
    """
    if not reset_peak_rss():
        return fn(), None
    base = status_kib("VmRSS")
    result = fn()
    return result, (status_kib("VmHWM") - base) / 1024


# ---------------------------------------------------------------------- evidence
def fit_evidence(model: Any, optimizer: str, steps: int, lr: float, *, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9) -> int:
    """Maximize ``model.log_evidence()`` over ``model.parameters()`` (δ, σ²).

    Parameters
    ----------
    model : ntkgp.LinearizedGP
        The model; its hyperparameters are changed in place.
    optimizer : {"lbfgs", "adam"}
        ``"lbfgs"``: L-BFGS with strong Wolfe line search, learning rate ``lr``, at most ``steps``
        iterations; ``"adam"``: ``steps`` Adam steps at ``lr``.
    steps : int
        Iterations (L-BFGS) or steps (Adam).
    lr : float
        Learning rate.
    tolerance_grad, tolerance_change : float
        L-BFGS's stopping tolerances.

    Returns
    -------
    int
        Evaluations of the evidence (with its gradient).
    """
    params = list(model.parameters())
    evaluations = 0
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=lr, max_iter=steps, tolerance_grad=tolerance_grad,
                                tolerance_change=tolerance_change, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            nonlocal evaluations
            evaluations += 1
            opt.zero_grad()
            loss = -model.log_evidence()
            loss.backward()
            return loss

        opt.step(closure)
        return evaluations
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        evaluations += 1
        opt.zero_grad()
        (-model.log_evidence()).backward()
        opt.step()
    return evaluations


# ---------------------------------------------------------------------- NTK Gram benchmarks
def start_gram_run(threads: int) -> dict[str, Any]:
    """Set torch's threads (0: leave the default), describe the machine and print it.

    Parameters
    ----------
    threads : int
        Torch threads; 0 leaves torch's default.

    Returns
    -------
    dict
        :func:`machine_info` without inter-op threads and library versions.
    """
    if threads:
        torch.set_num_threads(threads)
    info = machine_info(interop_threads=False, versions=())
    print(f"# machine: {info['cpu_model']}, {info['usable_cores']} usable cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), load {info['loadavg_at_start']}", flush=True)
    return info


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
        ``n`` and :func:`max_rel_err` of structured vs generic (float32, float64) and of each
        float32 Gram against the float64 generic one.
    """
    import copy

    from ntkgp import FunctionalNetwork
    from ntkgp.gram import ntk_gram
    from ntkgp.parameter_groups import parameter_groups

    groups = parameter_groups(FunctionalNetwork(net, input_shape).names, 1.0)
    k_fast = ntk_gram(FunctionalNetwork(net, input_shape), groups, x, budget=budget)
    k_slow = ntk_gram(FunctionalNetwork(net, input_shape, structured=False), groups, x, budget=budget)
    net64 = copy.deepcopy(net).double()
    k64_slow = ntk_gram(FunctionalNetwork(net64, input_shape, structured=False), groups, x.double(), budget=budget)
    k64_fast = ntk_gram(FunctionalNetwork(net64, input_shape), groups, x.double(), budget=budget)
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
        lines.append(f"| generic vmap(jacrev) | {g['median']:.2f} | {len(g['seconds'])} | "
                     f"(structured is **{result['speedup']:.1f}x** faster) | {fmt_mib(g['peak_mib'])} |")
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


# ---------------------------------------------------------------------- reporting
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


def write_json(data: Any, path: str | Path | None) -> None:
    """Write ``data`` as indented JSON to ``path`` (creating its folder) and print ``wrote <path>``.

    Parameters
    ----------
    data : object
        JSON-serializable.
    path : str or Path, optional
        The file; nothing is written if it is None or empty.
    """
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")


def start_report(args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Set torch's threads to ``args.threads``, start the clock and print the machine.

    Parameters
    ----------
    args : argparse.Namespace
        The script's arguments, with ``threads``.

    Returns
    -------
    report : dict
        ``machine`` (:func:`machine_info`) and ``config`` (the arguments).
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
