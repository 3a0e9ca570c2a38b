"""Batch broadcasting and device handling for ntkgp's operators, which are not batch-aware.

:class:`UnbatchedOperator` and :class:`DeviceBoundOperator` are their bases; the functions are what those
bases call."""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator
from linear_operator.utils.generic import _to_helper


def expand_dense(op: LinearOperator, batch_shape: torch.Size) -> LinearOperator:
    """Broadcast a non-batched operator to ``batch_shape`` by densifying it once.

    ntkgp's operators represent one matrix; GPyTorch's exact-GP flows never batch them. Where
    linear_operator needs a batch (e.g. adding a batched tensor), the dense matrix is expanded
    (a view, no copies).
    """
    dense = op.to_dense()
    return DenseLinearOperator(dense.expand(*batch_shape, *dense.shape[-2:]))


def unsqueeze_dense(op: LinearOperator, dim: int) -> LinearOperator:
    """Add a batch dimension to a non-batched operator by densifying it once."""
    return DenseLinearOperator(op.to_dense().unsqueeze(dim))


def to_same_device(op: LinearOperator, *args: Any, **kwargs: Any) -> LinearOperator:
    """``op.to(...)`` for ntkgp's operators: they stay on the network's device; a dtype goes to ``op.type``.

    A device given as a string or an index (``op.to("cuda")``, ``op.to(0)``), which linear_operator's
    argument parser passes over, counts as a device too.
    """
    args = tuple(torch.device(a) if isinstance(a, (str, int)) and not isinstance(a, bool) else a for a in args)
    device, dtype = _to_helper(*args, **kwargs)
    if device is not None and torch.device(device) != op.device:
        raise ValueError(
            f"ntkgp's operators live on the network's device ({op.device}); move the network and "
            "build the model again instead"
        )
    return op if dtype is None or dtype == op.dtype else op.type(dtype)


class UnbatchedOperator(LinearOperator):
    """A base for ntkgp's operators: one matrix, given batch dimensions by densifying it once
    (:func:`expand_dense`, :func:`unsqueeze_dense`)."""

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        return expand_dense(self, batch_shape)

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        return unsqueeze_dense(self, dim)


class DeviceBoundOperator(UnbatchedOperator):
    """An :class:`UnbatchedOperator` that stays on the network's device (:func:`to_same_device`)."""

    def to(self, *args: Any, **kwargs: Any) -> LinearOperator:
        return to_same_device(self, *args, **kwargs)
