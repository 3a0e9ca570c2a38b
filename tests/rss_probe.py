"""Peak-RSS probes: run a script in a fresh CPU-only subprocess and read the last line it prints.

The scripts reset the kernel's peak-RSS counter (``/proc/self/clear_refs``) after their setup and
print ``VmHWM`` minus the resident size at that point, so the number is what the measured step added.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["needs_clear_refs", "probe"]


def _clear_refs_writable() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


#: skip a test where the peak-RSS counter cannot be reset (not Linux, or no permission)
needs_clear_refs = pytest.mark.skipif(
    not _clear_refs_writable(), reason="needs a writable /proc/self/clear_refs (Linux)"
)


def probe(script: str, *args: str, threads: int, mmap_threshold: int | None = None) -> str:
    """The last line ``script`` prints, run with ``args`` in a subprocess on ``threads`` OpenMP threads.

    ``mmap_threshold``: if given, glibc serves every allocation of at least that many bytes by ``mmap``
    (``MALLOC_MMAP_THRESHOLD_``), so a freed block leaves the resident set at once and the peak counts live
    memory only. By default glibc raises its threshold to the size of freed blocks (up to 32 MiB) and serves
    blocks below it from the heap, where freed ones may stay resident: a probe of blocks of a few MiB to
    32 MiB then adds a retention that varies from run to run (a 50-example chunk of 27 MB captures: peaks of
    14-85 MiB over identical runs, 15-25 MiB with a 1 MiB threshold).
    """
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(threads)}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]
