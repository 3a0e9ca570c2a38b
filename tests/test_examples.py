"""Smoke runs of every script in ``examples/``: each must finish with ``--smoke`` and write its figure.

The scripts run in a subprocess, as a user runs them, with the ``ntkgp`` this test process imported
first on ``PYTHONPATH`` (the development virtualenv may hold an editable install of another checkout).
Deselect them with ``-m "not examples"``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ntkgp

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
#: per-test limit; the subprocess gets a little less, so that a hung script is killed and its output shown
TIMEOUT = 120


def _env() -> dict[str, str]:
    """The parent's environment, headless matplotlib, and this process's ``ntkgp`` first on the path."""
    package_root = str(Path(ntkgp.__file__).resolve().parents[1])
    path = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join(path)}


def _tail(text: str, chars: int = 4000) -> str:
    return text[-chars:] if text else "(empty)"


def test_examples_are_found() -> None:
    assert EXAMPLES, "no examples/*.py found"


@pytest.mark.examples
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_smoke(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    command = [sys.executable, str(script), "--smoke", "--out", str(out)]
    try:
        proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT - 10)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        pytest.fail(f"{script.name} --smoke ran past {err.timeout} s; stderr tail:\n{_tail(stderr)}")
    assert proc.returncode == 0, (
        f"{script.name} --smoke exited with {proc.returncode}; stderr tail:\n{_tail(proc.stderr)}"
    )
    assert out.is_file(), f"{script.name} --smoke wrote no {out.name}; stdout tail:\n{_tail(proc.stdout)}"
    assert out.stat().st_size > 0, f"{script.name} --smoke wrote an empty {out.name}"
