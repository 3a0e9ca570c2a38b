"""Switchable tqdm progress bars for long passes over data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable[T], *, desc: str = "", enable: bool = True) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar when ``enable`` is true; otherwise return it unchanged."""
    if not enable:
        return iterable
    return tqdm(iterable, desc=f"ntkgp {desc}".strip(), leave=False)
