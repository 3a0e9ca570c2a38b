"""Measurements in a fresh process, so that no run sees another's allocations, caches or imports."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

_T = TypeVar("_T")


def run_spawned(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a fresh process started by ``multiprocessing``'s "spawn" (one task per process).

    The child imports ``fn``'s module afresh (the script itself, as ``__mp_main__``, when ``fn``
    is defined in the script being run) with the parent's ``sys.path``.

    Parameters
    ----------
    fn : callable
        A module-level function (it is pickled by reference).
    *args
        Its arguments (pickled).

    Returns
    -------
    object
        What ``fn`` returned (pickled back).
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
