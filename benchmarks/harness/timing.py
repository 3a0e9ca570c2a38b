"""Wall-clock timing: phases of a workflow, repeated calls, and routes timed with their peak memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness.memory import peak_memory


def sync(device: torch.device | str | None) -> None:
    """Wait until the work queued on ``device`` is done (CUDA); nothing on the CPU or for None.

    Parameters
    ----------
    device : torch.device or str or None
        The device.
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


class DeviceClock(PhaseTimer):
    """A :class:`PhaseTimer` for work queued on a device, whose ``"total"`` is current after every mark.

    The device is synchronized (:func:`sync`) before the clock starts and before every mark, so a
    phase includes its queued GPU work. ``"total"``, the seconds since the start, is recorded at
    the first mark (after that phase) and updated at every later one; there is no :meth:`stop`
    to call.

    Parameters
    ----------
    device : torch.device
        The device the timed work runs on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        sync(device)
        super().__init__()

    def mark(self, phase: str) -> None:
        """Synchronize the device, record ``phase`` (see :meth:`PhaseTimer.mark`) and update ``"total"``.

        Parameters
        ----------
        phase : str
            Name of the phase just ended.
        """
        sync(self.device)
        super().mark(phase)
        self.times["total"] = self._lap - self.start


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
        Peak RSS the first call added, in MiB (see :func:`~benchmarks.harness.memory.peak_memory`).
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
