"""Memory probes: the peak resident memory a piece of work adds (Linux ``/proc``), device memory, free memory."""

from __future__ import annotations

import contextlib
import gc
import re
import resource
from collections.abc import Callable

import torch

#: bytes per KiB, MiB and GiB
KiB, MiB, GiB = 2**10, 2**20, 2**30


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
        self.peak_delta = max(0, peak_kib - self.baseline_kib) * KiB


class PeakMemory:
    """Peak device memory (CUDA) or added peak RSS (CPU, by :class:`PeakRSS`) of the body, in bytes.

    On CUDA, entry collects garbage, synchronizes, empties the allocator's cache, resets its peak
    statistics and reads the allocated bytes; on exit :attr:`peak` is
    ``torch.cuda.max_memory_allocated`` minus those.

    Parameters
    ----------
    device : torch.device
        The device the body runs on.

    Attributes
    ----------
    peak : int
        Peak memory added by the body, in bytes; set on exit.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        gc.collect()  # earlier models (GPyTorch modules hold reference cycles) release their device memory
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.rss.__exit__(*exc)
            self.peak = self.rss.peak_delta


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


def peak_rss_gb() -> float:
    """The process's lifetime peak RSS (``ru_maxrss``, which cannot be reset), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo``, or None."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None
