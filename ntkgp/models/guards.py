"""What a LinearizedGP refuses, and the loss term of approximate solvers.

A GP caches products of its training data and computes with the network's own dtype and device:
GPyTorch's ``set_train_data`` and module conversions (``.float()``, ``.to(...)``) are refused with a
message naming the way out, rather than leaving caches that no longer match.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from gpytorch.mlls import AddedLossTerm
from torch import Tensor

if TYPE_CHECKING:
    from ntkgp.models.linearized_gp import LinearizedGP

__all__ = ["CorrectionTerm", "FixedDataMixin"]


class CorrectionTerm(AddedLossTerm):
    """The approximate solver's evidence correction (the collapsed bound's trace term), as the
    GPyTorch added loss term that ``ExactMarginalLogLikelihood`` adds to the log likelihood."""

    def __init__(self, compute: Callable[[], Tensor]) -> None:
        self.compute = compute

    def loss(self, *params: Any) -> Tensor:
        return self.compute()


class FixedDataMixin:
    """``set_train_data`` and conversions of :class:`~ntkgp.LinearizedGP`, refused with a clear message."""

    def set_train_data(self, inputs: Any = None, targets: Any = None, strict: bool = True) -> None:
        """Not supported: the solver caches Grams of the training inputs. Add points with :meth:`add_data`
        (or :meth:`get_fantasy_model`), or build a new LinearizedGP."""
        raise NotImplementedError(
            "LinearizedGP caches Jacobian products of its training data: add observations with add_data(x, y) "
            "(in place) or get_fantasy_model(x, y) (a new GP), or build a new LinearizedGP for other data"
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> FixedDataMixin:
        probe = torch.zeros((), dtype=torch.float64, device=cast("LinearizedGP", self).network.device)
        moved = fn(probe)
        if moved.dtype != probe.dtype or moved.device != probe.device:
            raise TypeError(
                "a LinearizedGP cannot be converted or moved (.float(), .double(), .half(), .to(...)): it computes "
                "in float64 with the network's own dtype and device. Convert or move the network, then build a new "
                "LinearizedGP from it."
            )
        return super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
