r"""Where the Bayesian parameters enter the network: structured call sites, seen by a ``TorchFunctionMode``.

The structured routes need, for each parameter, the maps it enters and what those maps act on.
:class:`CaptureMode` is active while the network runs once (``FunctionalNetwork.evaluate``) and
looks at every torch function called with a Bayesian tensor of :math:`\theta` as an argument:

* **dense** maps :math:`z_{n,l} = W u_{n,l} + b` at positions :math:`l`: ``F.linear`` (``u`` the
  input rows, one position per row of a ``(n, ..., d_in)`` input), ``F.conv1d``/``F.conv2d`` with
  ``groups=1`` (``u`` the unfolded input patches, one position per output pixel);
* **embedding** lookups ``F.embedding`` (``u`` the one-hot token ids, never formed);
* **affine** scalings :math:`z = \hat x \odot w + b` of normalization layers: ``F.layer_norm``,
  ``F.rms_norm``, ``F.group_norm``, ``F.batch_norm`` in eval mode (``\hat x`` the normalized input);
* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) is evaluated through
  :mod:`ntkgp.structured.attention`, whose projections are ``F.linear`` sites.

Each such call is a :class:`Site`. Any other call that makes a tensor from a Bayesian parameter
(``W.t()``, ``W * 2``, ``x @ W``, a fused RNN kernel) marks that parameter *opaque*: it takes the
generic route (:mod:`ntkgp.structured.plan`). With ``capture=True`` the mode also keeps each site's
input and adds a zero "probe" tensor to its output, so one backward pass per network output gives
the output cotangents :math:`g_{n,c,l}` (:mod:`ntkgp.structured.capture`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["CaptureMode", "Site", "SiteKind", "conv_patches"]

SiteKind = Literal["dense", "embedding", "affine"]


@dataclass
class Site:
    """One call of a structured map on Bayesian tensors, during one evaluation.

    ``inputs`` is ``u`` in the canonical form of the kind (kept with ``capture=True``):

    * dense ``(n, L, t)``: input rows or unfolded patches (``t = d_in k``);
    * embedding ``(n, L)``: token ids, ``-1`` where the lookup has no gradient (``padding_idx``);
    * affine ``(n, L, d)``: the normalized input :math:`\\hat x`.

    ``to_positions`` maps an output-shaped tensor ``(n, C, *out)`` to ``(n, C, L, d_out)``.
    """

    kind: SiteKind
    weight: int | None
    bias: int | None
    #: leading size of the site's input: the batch size when the site is batched
    lead: int | None
    #: a signature for matching sites across evaluations: (function name, shapes after the batch dim)
    signature: tuple[Any, ...]
    inputs: Tensor | None = None
    probe: Tensor | None = None
    to_positions: Callable[[Tensor], Tensor] | None = None
    #: input tensor and its version counter when captured (an in-place change later is detected)
    source: tuple[Tensor, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def conv_patches(x: Tensor, kernel: tuple[int, ...], stride: Any, padding: Any, dilation: Any) -> Tensor:
    r"""Unfolded input patches :math:`U_n` of a convolution: ``(n, d_in, *spatial)`` -> ``(n, L, d_in k)``.

    With them the convolution is :math:`z_{n,l} = W u_{n,l} + b` at every output position :math:`l`,
    ``W`` the weight reshaped to ``(d_out, d_in k)`` (channel-major, then taps). ``padding`` is an
    int, a tuple or ``"valid"``/``"same"`` (with its asymmetric split); zero padding, as ``F.conv``
    pads (modules with another ``padding_mode`` pad before they call it). Conv1d runs as a Conv2d of
    height 1.
    """
    dims = len(kernel)
    stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
    if isinstance(padding, str):
        pads = [0, 0] * dims
        if padding == "same":
            for i, (d, k) in enumerate(zip(reversed(dilation), reversed(kernel))):
                total = d * (k - 1)
                pads[2 * i], pads[2 * i + 1] = total // 2, total - total // 2
    else:
        pads = [p for p in reversed(_tuple(padding, dims)) for _ in range(2)]
    if any(pads):
        x = F.pad(x, pads)
    if dims == 1:  # shape: (n, d_in, T) -> (n, d_in, 1, T)
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
    # shape: (n, d_in * k, L) -> (n, L, d_in * k)
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _last_dim(d: int) -> Callable[[Tensor], Tensor]:
    """``(n, C, *, d)`` -> ``(n, C, L, d)``: positions are all dims between the batch and the last ``d``."""
    return lambda t: t.reshape(t.shape[0], t.shape[1], -1, d)


def _channel_dim(t: Tensor) -> Tensor:
    """``(n, C, ch, *spatial)`` -> ``(n, C, L, ch)``: positions are the spatial dims."""
    return t.reshape(t.shape[0], t.shape[1], t.shape[2], -1).transpose(2, 3)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class CaptureMode(TorchFunctionMode):
    """Sees every torch call on Bayesian tensors during one evaluation (see the module docstring).

    Parameters
    ----------
    index:
        ``id(tensor) -> position in θ`` for the Bayesian tensors as the network receives them.
    capture:
        Keep site inputs and attach probes (a capture pass); ``False`` only records (discovery).
    keep_graph:
        Keep the site inputs' graph (a differentiable capture, :mod:`ntkgp.structured.capture`);
        by default they are detached.
    """

    def __init__(self, index: dict[int, int], *, capture: bool, keep_graph: bool = False) -> None:
        super().__init__()
        self.index, self.capture, self.keep_graph = index, capture, keep_graph
        self.sites: list[Site] = []
        #: θ positions used by calls the structured routes do not cover
        self.opaque: set[int] = set()
        #: entries of all tensors the evaluation produced (a bound on what a capture pass holds)
        self.produced = 0

    def uses(self, args: Any, kwargs: Any) -> set[int]:
        """Positions in θ of the Bayesian tensors among ``args`` and ``kwargs``."""
        return {
            self.index[id(leaf)]
            for leaf in tree_flatten((args, kwargs))[0]
            if isinstance(leaf, Tensor) and id(leaf) in self.index
        }

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(self, func, tuple(args), kwargs)
            if out is not NotImplemented:
                return out
        used = self.uses(args, kwargs)
        out = func(*args, **kwargs)
        leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        self.produced += sum(t.numel() for t in leaves)
        if used and leaves and not any(id(t) in self.index for t in leaves):
            self.opaque |= used  # a tensor made from a Bayesian parameter outside a structured map
        return out

    # ------------------------------------------------------------------ sites
    def add(self, site: Site, source: Tensor, inputs: Callable[[], Tensor], out: Tensor) -> Tensor:
        """Record ``site`` for a call on ``source`` with output ``out``; return the output to use."""
        self.produced += out.numel()
        self.sites.append(site)
        if not self.capture:
            site.source = (source, source._version)
            return out
        site.inputs = inputs() if self.keep_graph else inputs().detach()
        site.source = (source, source._version)
        site.probe = torch.zeros_like(out, requires_grad=True)
        return out + site.probe

    def plain(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], used: set[int]) -> Any:
        """Run ``func`` as an unstructured call on ``used`` (they become opaque)."""
        self.opaque |= used
        return func(*args, **kwargs)


def _roles(mode: CaptureMode, weight: Any, bias: Any) -> tuple[int | None, int | None]:
    w = mode.index.get(id(weight)) if isinstance(weight, Tensor) else None
    b = mode.index.get(id(bias)) if isinstance(bias, Tensor) else None
    return w, b


def _linear(mode: CaptureMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, weight, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    w, b = _roles(mode, weight, bias)
    if w is None and b is None:
        return NotImplemented
    if id(x) in mode.index or x.dim() < 2:  # a parameter as the input, or an unbatched input
        return mode.plain(func, args, kwargs, {i for i in (w, b) if i is not None} | mode.uses((x,), {}))
    d_in, d_out = x.shape[-1], weight.shape[0]
    site = Site("dense", w, b, x.shape[0], ("linear", tuple(x.shape[1:]), d_out), to_positions=_last_dim(d_out))
    return mode.add(site, x, lambda: x.reshape(x.shape[0], -1, d_in), func(*args, **kwargs))


def _conv(dims: int) -> Callable[..., Any]:
    def handler(mode: CaptureMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, weight, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        w, b = _roles(mode, weight, bias)
        if w is None and b is None:
            return NotImplemented
        stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
        dilation, groups = _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1)
        if groups != 1 or x.dim() != dims + 2 or id(x) in mode.index:
            return mode.plain(func, args, kwargs, {i for i in (w, b) if i is not None})
        kernel = tuple(weight.shape[2:])
        signature = (f"conv{dims}d", tuple(x.shape[1:]), tuple(weight.shape), stride, padding, dilation)
        site = Site("dense", w, b, x.shape[0], signature, to_positions=_channel_dim)
        return mode.add(site, x, lambda: conv_patches(x, kernel, stride, padding, dilation), func(*args, **kwargs))

    return handler


def _embedding(mode: CaptureMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    ids, weight = args[0], _arg(args, kwargs, 1, "weight")
    w, _ = _roles(mode, weight, None)
    if w is None:
        return NotImplemented
    padding_idx, max_norm = _arg(args, kwargs, 2, "padding_idx"), _arg(args, kwargs, 3, "max_norm")
    by_freq = _arg(args, kwargs, 5, "scale_grad_by_freq", False)
    if max_norm is not None or by_freq or ids.dim() < 1 or ids.is_floating_point():
        return mode.plain(func, args, kwargs, {w})
    d = weight.shape[1]
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]

    def inputs() -> Tensor:
        flat = ids.reshape(ids.shape[0], -1).long()
        return flat if padding_idx is None else flat.masked_fill(flat == padding_idx, -1)

    site = Site(
        "embedding",
        w,
        None,
        ids.shape[0],
        ("embedding", tuple(ids.shape[1:]), tuple(weight.shape)),
        to_positions=_last_dim(d),
    )
    site.extra["vocabulary"] = weight.shape[0]
    return mode.add(site, ids, inputs, func(*args, **kwargs))


def _affine(name: str, normalize: Callable[..., Tensor], weight_at: int, last: bool) -> Callable[..., Any]:
    """Handler of a normalization with an elementwise affine: ``normalize(args, kwargs)`` gives :math:`\\hat x`."""

    def handler(mode: CaptureMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        weight = _arg(args, kwargs, weight_at, "weight")
        bias = _arg(args, kwargs, weight_at + 1, "bias") if name != "rms_norm" else None
        w, b = _roles(mode, weight, bias)
        if w is None and b is None:
            return NotImplemented
        if name == "batch_norm" and _arg(args, kwargs, 5, "training", False):
            return mode.plain(func, args, kwargs, {i for i in (w, b) if i is not None})
        if id(x) in mode.index or x.dim() < 2:
            return mode.plain(func, args, kwargs, {i for i in (w, b) if i is not None})
        source = weight if weight is not None else bias  # one of them is a Bayesian tensor
        assert isinstance(source, Tensor)
        d = source.numel()
        site = Site(
            "affine",
            w,
            b,
            x.shape[0],
            (name, tuple(x.shape[1:]), d),
            to_positions=_last_dim(d) if last else _channel_dim,
        )

        def inputs() -> Tensor:
            xhat = normalize(args, kwargs)
            return xhat.reshape(xhat.shape[0], -1, d) if last else _channel_dim(xhat.unsqueeze(1))[:, 0]

        return mode.add(site, x, inputs, func(*args, **kwargs))

    return handler


def _layer_norm_hat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    shape, eps = _arg(args, kwargs, 1, "normalized_shape"), _arg(args, kwargs, 4, "eps", 1e-5)
    return F.layer_norm(args[0], shape, None, None, eps)


def _rms_norm_hat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    shape, eps = _arg(args, kwargs, 1, "normalized_shape"), _arg(args, kwargs, 3, "eps")
    return F.rms_norm(args[0], shape, None, eps)


def _group_norm_hat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    groups, eps = _arg(args, kwargs, 1, "num_groups"), _arg(args, kwargs, 4, "eps", 1e-5)
    return F.group_norm(args[0], groups, None, None, eps)


def _batch_norm_hat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    mean, var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    eps = _arg(args, kwargs, 7, "eps", 1e-5)
    return F.batch_norm(args[0], mean, var, None, None, False, 0.0, eps)


def _attention(mode: CaptureMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from ntkgp.structured.attention import multi_head_attention

    if not mode.uses(args, kwargs):
        return NotImplemented
    with mode:  # run the decomposition with the mode active: its projections become linear sites
        return multi_head_attention(mode, func, args, kwargs)


_HANDLERS: dict[Any, Callable[..., Any]] = {
    F.linear: _linear,
    F.conv1d: _conv(1),
    F.conv2d: _conv(2),
    F.embedding: _embedding,
    F.layer_norm: _affine("layer_norm", _layer_norm_hat, 2, last=True),
    F.group_norm: _affine("group_norm", _group_norm_hat, 2, last=False),
    F.batch_norm: _affine("batch_norm", _batch_norm_hat, 3, last=False),
    F.multi_head_attention_forward: _attention,
}
if hasattr(F, "rms_norm"):
    _HANDLERS[F.rms_norm] = _affine("rms_norm", _rms_norm_hat, 2, last=True)
