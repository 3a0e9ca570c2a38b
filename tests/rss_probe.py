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


def probe(script: str, *args: str, threads: int) -> str:
    """The last line ``script`` prints, run with ``args`` in a subprocess on ``threads`` OpenMP threads."""
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(threads)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]
