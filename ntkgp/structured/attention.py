r"""Multi-head attention with its projections as structured ``F.linear`` sites.

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward``, one composite torch function
that a ``TorchFunctionMode`` sees as a whole (with ``in_proj_weight`` and ``out_proj.weight`` as
arguments), and whose projections act on sequence-first ``(L, n, E)`` tensors. During a capture
(:mod:`ntkgp.structured.sites`) it is evaluated by :func:`multi_head_attention` instead: the same
function, written batch-first, whose three input projections and output projection are
``F.linear`` calls on ``(n, L, E)`` inputs, so each becomes a dense site with positions ``L``.

* Self-attention (``query is key is value``) projects once with the packed ``in_proj_weight``.
  Otherwise each of query, key and value is projected with the whole packed weight and the
  needed third is kept: three uses of one weight, whose positions the structured route
  concatenates (the unused outputs get zero cotangents).
* Masks (``attn_mask`` 2-D or 3-D, boolean or additive; ``key_padding_mask``) and ``is_causal`` are
  applied as ``F.multi_head_attention_forward`` applies them; attention weights are returned
  when asked for.

Configurations it does not cover (``add_bias_kv``, ``add_zero_attn``, ``static_k``/``static_v``,
dropout in training, unbatched inputs) fall back to the original function, and the parameters
involved take the generic route. The structured route is checked against the generic one when
the network is built (:func:`ntkgp.ntk.verify.verify_plan`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ntkgp.structured.sites import CaptureMode

__all__ = ["multi_head_attention"]

_NAMES = (
    "query",
    "key",
    "value",
    "embed_dim_to_check",
    "num_heads",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "add_zero_attn",
    "dropout_p",
    "out_proj_weight",
    "out_proj_bias",
    "training",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "use_separate_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "static_k",
    "static_v",
    "average_attn_weights",
    "is_causal",
)
_DEFAULTS = {
    "training": True,
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "use_separate_proj_weight": False,
    "q_proj_weight": None,
    "k_proj_weight": None,
    "v_proj_weight": None,
    "static_k": None,
    "static_v": None,
    "average_attn_weights": True,
    "is_causal": False,
}


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = masked) as an additive float mask; float masks unchanged."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def multi_head_attention(mode: CaptureMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``F.multi_head_attention_forward(*args, **kwargs)`` with batch-first ``F.linear`` projections."""
    a = {**_DEFAULTS, **dict(zip(_NAMES, args)), **kwargs}
    query, key, value = a["query"], a["key"], a["value"]
    unsupported = (
        a["bias_k"] is not None
        or a["bias_v"] is not None
        or a["add_zero_attn"]
        or a["static_k"] is not None
        or a["static_v"] is not None
        or query.dim() != 3
        or (a["training"] and a["dropout_p"] > 0)
        or a["use_separate_proj_weight"]
    )
    if unsupported:
        return mode.plain(func, args, kwargs, mode.uses(args, kwargs))
    heads, w, b = a["num_heads"], a["in_proj_weight"], a["in_proj_bias"]
    tgt, n, embed = query.shape
    head = embed // heads
    self_attention = query is key and key is value
    # shape: (L, n, E) -> (n, L, E), then project
    q_in, k_in, v_in = (t.transpose(0, 1) for t in (query, key, value))
    if self_attention:
        q, k, v = F.linear(q_in, w, b).chunk(3, dim=-1)
    else:
        q = F.linear(q_in, w, b)[..., :embed]
        k = F.linear(k_in, w, b)[..., embed : 2 * embed]
        v = F.linear(v_in, w, b)[..., 2 * embed :]
    src = k.shape[1]
    # shape: (n, L, E) -> (n, heads, L, head)
    q, k, v = (t.reshape(n, t.shape[1], heads, head).transpose(1, 2) for t in (q, k, v))
    mask = _additive(a["attn_mask"], q.dtype)
    if mask is not None:
        mask = mask.reshape(n, heads, tgt, src) if mask.dim() == 3 else mask.reshape(1, 1, tgt, src)
    padding = _additive(a["key_padding_mask"], q.dtype)
    is_causal = a["is_causal"]
    if padding is not None:
        padding = padding.reshape(n, 1, 1, src)
        mask = padding if mask is None else mask + padding
    if is_causal and mask is None and a["attn_mask"] is None:
        causal = torch.ones(tgt, src, dtype=torch.bool, device=q.device).tril()
        causal_mask = _additive(~causal, q.dtype)
        assert causal_mask is not None
        mask = causal_mask.reshape(1, 1, tgt, src)
    scores = (q * (1.0 / math.sqrt(head))) @ k.transpose(-2, -1)  # shape: (n, heads, tgt, src)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, tgt, embed)  # shape: (n, tgt, E)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).transpose(0, 1)  # shape: (tgt, n, E)
    if not a["need_weights"]:
        return out, None
    return out, weights.mean(dim=1) if a["average_attn_weights"] else weights
