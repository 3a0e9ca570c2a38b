"""Batched right-hand sides as columns, for operators that multiply one matrix at a time."""

from __future__ import annotations

from torch import Tensor

__all__ = ["as_columns", "from_columns"]


def as_columns(rhs: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(*B, M, t)`` -> ``(M, prod(B) * t)`` and the trailing shape to restore."""
    if rhs.dim() == 2:
        return rhs, ()
    batch = tuple(rhs.shape[:-2])
    return rhs.movedim(-2, 0).reshape(rhs.shape[-2], -1), batch


def from_columns(out: Tensor, batch: tuple[int, ...], t: int) -> Tensor:
    """Inverse of :func:`as_columns`: ``(M, prod(B) * t)`` -> ``(*B, M, t)``."""
    if not batch:
        return out
    return out.reshape(out.shape[0], *batch, t).movedim(0, -2)
