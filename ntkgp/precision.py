r"""Full IEEE float32 arithmetic on CUDA: no TF32 inside ntkgp's network passes.

On Ampere and later GPUs, cuDNN convolutions run in TF32 by default
(``torch.backends.cudnn.allow_tf32`` is ``True``), and many users switch cuBLAS matmuls to TF32
for training (``torch.set_float32_matmul_precision("high")``). TF32 keeps 10 mantissa bits, so a
float32 network's outputs, Jacobians and structured factors would carry relative errors of about
1e-3: enough to move predictive variances, which are differences of nearly equal numbers, by far
more than that. ntkgp therefore runs every pass through the network inside :func:`ieee_float32`,
which switches TF32 off for the duration of the call and restores the caller's settings after.
Outside ntkgp's calls, the user's settings are untouched.

The flags are process-wide, like all of ``torch.backends``: another thread launching float32
kernels while an ntkgp call is running also gets full precision for that time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["full_precision", "ieee_float32"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _new_api() -> bool:
    """Whether this torch has the ``fp32_precision`` flags (torch >= 2.9)."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(
        getattr(torch.backends.cudnn, "conv", None), "fp32_precision"
    )


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Within the block, float32 matmuls and convolutions on CUDA use IEEE float32, not TF32.

    A no-op when CUDA is unavailable. Uses the ``fp32_precision`` flags where torch has them and
    the legacy ``allow_tf32`` flags otherwise (torch forbids mixing the two styles), and restores
    the previous values on exit.
    """
    if not torch.cuda.is_available():
        yield
        return
    if _new_api():
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv  # type: ignore[attr-defined]
        saved = (matmul.fp32_precision, conv.fp32_precision)
        if saved == ("ieee", "ieee"):
            yield
            return
        try:
            matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
        return
    matmul_flags, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved_legacy = (matmul_flags.allow_tf32, cudnn.allow_tf32)
    try:
        matmul_flags.allow_tf32, cudnn.allow_tf32 = False, False
        yield
    finally:
        matmul_flags.allow_tf32, cudnn.allow_tf32 = saved_legacy


def full_precision(method: _F) -> _F:
    """Decorator: run ``method`` inside :func:`ieee_float32`."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with ieee_float32():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
