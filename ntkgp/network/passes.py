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
* **Layer norm in elementary ops when the inputs carry a graph.** torch.func's transforms
  (``jvp``, ``jacrev``) differentiate ``F.layer_norm`` through formulas that use its saved mean and
  inverse deviation as constants, so their results are not differentiable in the inputs: torch
  2.13 gives input gradients of a jvp off by O(1). A pass that keeps the graph to its inputs
  (``inputs_graph=True``) evaluates ``F.layer_norm`` as mean, variance and scaling instead (the
  same function; rounding differs at the level of the dtype's epsilon). Other passes are unchanged.
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
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

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


def _layer_norm(
    x: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """``F.layer_norm`` in elementary ops (differentiable to any order under torch.func)."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


class _DecomposeLayerNorm(TorchFunctionMode):
    """Evaluates ``F.layer_norm`` by :func:`_layer_norm` (see the module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def network_pass(grad: bool, *, inputs_graph: bool = False) -> Iterator[None]:
    """Run a pass through the network (see the module docstring); ``grad`` switches autograd on or off,
    ``inputs_graph`` says that the pass keeps the graph to its inputs."""
    leave = torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()
    decompose = _DecomposeLayerNorm() if inputs_graph else contextlib.nullcontext()
    with leave, ieee_float32(), _attention_slow_path(), _math_attention(), torch.set_grad_enabled(grad), decompose:
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
