"""The check that a network's outputs are finite, with the rows that are not."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.errors import NonFiniteError

__all__ = ["check_finite_outputs"]


def check_finite_outputs(out: Tensor) -> None:
    """Raise :class:`~ntkgp.errors.NonFiniteError` naming the first rows of ``out`` ``(n, C)`` with NaN or inf."""
    finite = torch.isfinite(out).all(-1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten()[:5].tolist()
        raise NonFiniteError(
            f"the network's outputs are NaN or infinite on {int((~finite).sum())} of {out.shape[0]} inputs "
            f"(first rows: {rows})"
        )
