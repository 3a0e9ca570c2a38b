r"""The conditions every pass through the network runs under.

* **Full float32 precision** on CUDA (no TF32; :mod:`ntkgp.precision`).
* **No fused attention fast path.** ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
  switch in eval mode, when no gradient is needed, to fused kernels that compute the same
  function with other rounding. ntkgp's passes (the forward without gradients, Jacobians with
  them) would then linearize two slightly different functions; the fast path is switched off for
  the duration of each pass (``torch.backends.mha``; process-wide, like the TF32 flags).
* **Attention by the math kernel.** ``F.scaled_dot_product_attention`` runs its math backend, the
  one that supports forward-mode AD (jvps) and double backward, so every pass differentiates the
  same function (the flash and memory-efficient kernels support neither).
* **Out of inference mode.** Jacobians need autograd, which ``torch.inference_mode()`` switches off
  for good: a pass leaves inference mode for its duration, and inputs made in inference mode are
  copied into normal tensors (:func:`usable`). Results are ordinary tensors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

from ntkgp.precision import ieee_float32

_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = ["network_pass", "outside_inference_mode", "usable"]


@contextlib.contextmanager
def _attention_slow_path() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not mha.get_fastpath_enabled():
        yield
        return
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(True)


def _math_attention() -> contextlib.AbstractContextManager[None]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the legacy switch
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def network_pass(grad: bool) -> Iterator[None]:
    """Run a pass through the network (see the module docstring); ``grad`` switches autograd on or off."""
    leave = torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()
    with leave, ieee_float32(), _attention_slow_path(), _math_attention(), torch.set_grad_enabled(grad):
        yield


def usable(t: Tensor) -> Tensor:
    """``t``, or a normal copy of it when it was made in inference mode (autograd cannot save those)."""
    return t.clone() if t.is_inference() else t


def outside_inference_mode(method: _F) -> _F:
    """Decorator: run ``method`` out of ``torch.inference_mode()``.

    The model's caches (Grams, factors, posteriors) are built on first use, often inside a
    prediction the user wraps in ``inference_mode``; made there they would be inference tensors,
    which a later evidence gradient could not use. Everything the method creates is an ordinary
    tensor; grad mode is left as the caller set it.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
