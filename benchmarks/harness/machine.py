"""The machine a benchmark runs on: CPU model, cores, library versions, threads, load and GEMM rate."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.harness.timing import sync, time_calls

#: libraries whose versions :func:`machine_info` records by default
LIBRARIES = ("ntkgp", "laplace", "gpytorch", "linear_operator")
#: distribution names of the libraries whose import name differs
_DISTRIBUTIONS = {"laplace": "laplace-torch"}


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


def loadavg() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages, or None where the platform has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


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
    info["loadavg_at_start"] = loadavg()
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


def gemm_rate(
    size: int = 4096,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str | None = None,
    warmups: int = 1,
) -> dict[str, float]:
    """The machine's matmul rate: median over ``repeats`` of ``torch.mm`` on ``size x size`` in ``dtype``.

    Parameters
    ----------
    size : int, default 4096
        Side of the two square matrices.
    repeats : int, default 5
        Timed products, after ``warmups`` untimed ones.
    dtype : torch.dtype, default torch.float32
        Their dtype.
    device : torch.device or str, optional
        Where the matrices live (default: torch's default device). On CUDA every product is
        followed by a synchronization (:func:`~benchmarks.harness.timing.sync`), inside its time.
    warmups : int, default 1
        Untimed products first.

    Returns
    -------
    dict
        ``size``, ``seconds_median``, ``gflops`` (at the median) and ``gflops_best`` (at the fastest).
    """
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)

    def product() -> None:
        torch.mm(a, b)
        sync(device)

    for _ in range(warmups):
        product()
    times = time_calls(product, repeats)
    median = statistics.median(times)
    return {
        "size": size,
        "seconds_median": median,
        "gflops": 2 * size**3 / median / 1e9,
        "gflops_best": 2 * size**3 / min(times) / 1e9,
    }
