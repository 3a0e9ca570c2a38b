r"""Jacobian products of structured units from their captures: :math:`J^\top v`, :math:`J w` and columns of :math:`J`.

For a unit with inputs :math:`u_{n,l}` and cotangents :math:`g_{n,c,l}`
(:mod:`ntkgp.structured.capture`), with :math:`h_{t,n,l} = \sum_c v_{t,n,c}\, g_{n,c,l}`:

.. math::
    (J^\top v)_W = \sum_{n,l} h_{t,n,l}\, u_{n,l}^\top \ \text{(dense)},\quad
    \sum_{n,l} h_{t,n,l} \odot \hat x_{n,l} \ \text{(affine)},\quad
    \text{rows } \mathrm{id}_{n,l} \mathrel{+}= h_{t,n,l} \ \text{(embedding)};\qquad
    (J^\top v)_b = \sum_{n,l} h_{t,n,l},

    (J w)_{t,n,c} = \sum_l g_{n,c,l} \cdot y_{t,n,l},\qquad
    y_{t,n,l} = W_t u_{n,l} + b_t \ \text{(dense)},\quad (W_t)_{\mathrm{id}_{n,l}} \ \text{(embedding)},\quad
    w_t \odot \hat x_{n,l} + b_t \ \text{(affine)}.

Per unit and vector that is :math:`O(n L (t + C) d_{out})` flops and no per-example Jacobian: ``C``
times fewer flops than contracting Jacobians ``(n, C, P)`` with the vectors, and no ``C`` backward
passes per example to build them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.structured.capture import UnitCapture
from ntkgp.structured.plan import Unit
from ntkgp.structured.positions import weight_gradients

__all__ = ["unit_columns", "unit_pullback", "unit_pushforward", "write_columns"]


def _contract_outputs(v: Tensor, g: Tensor) -> Tensor:
    """``sum_c v[t, n, c] g[n, c, l, :]``: ``(t, n, C)``, ``(n, C, L, d)`` -> ``(t, n, L, d)``."""
    if g.shape[1] == 1:  # a broadcast product; einsum would run n tiny batched GEMMs
        return v[:, :, :1, None] * g[None, :, 0]
    return torch.einsum("tnc,ncld->tnld", v, g)


def _expand_outputs(y: Tensor, g: Tensor) -> Tensor:
    """``sum_l y[t, n, l, :] . g[n, c, l, :]`` for every output: ``(t, n, L, d)``, ``(n, C, L, d)`` -> ``(t, n, C)``."""
    if g.shape[1] == 1:  # as in _contract_outputs
        return (y * g[None, :, 0]).sum((-2, -1)).unsqueeze(-1)
    return torch.einsum("tnld,ncld->tnc", y, g)


def unit_pullback(unit: Unit, capture: UnitCapture, v: Tensor) -> dict[int, Tensor]:
    r""":math:`J^\top v` for the unit's tensors: ``v`` ``(t, n, C)`` -> ``{θ position: (t, numel)}``."""
    g, u = capture.cotangents, capture.inputs
    h = _contract_outputs(v.to(g.dtype), g)  # shape: (t, n, L, d_out)
    t = h.shape[0]
    out = {}
    if unit.weight is not None:
        assert u is not None
        if unit.kind == "dense":
            out[unit.weight] = torch.einsum("tnld,nle->tde", h, u.to(h.dtype)).reshape(t, -1)
        elif unit.kind == "affine":
            out[unit.weight] = torch.einsum("tnld,nld->td", h, u.to(h.dtype))
        else:
            valid = (u >= 0).reshape(-1)
            rows = u.reshape(-1)[valid]
            values = h.reshape(t, -1, h.shape[-1])[:, valid]  # shape: (t, n*L valid, d)
            table = torch.zeros(t, unit.taps, h.shape[-1], dtype=h.dtype, device=h.device)
            out[unit.weight] = table.index_add_(1, rows, values).reshape(t, -1)
    if unit.bias is not None:
        out[unit.bias] = h.sum((1, 2))
    return out


def unit_pushforward(unit: Unit, capture: UnitCapture, tangents: dict[int, Tensor]) -> Tensor | None:
    r""":math:`J w` of the unit's tensors: ``{θ position: (t, numel)}`` -> ``(t, n, C)`` (``None`` if none given)."""
    g, u = capture.cotangents, capture.inputs
    n, C, L, d = g.shape
    y: Tensor | None = None  # shape: (t, n, L, d_out), the tangent of the sites' outputs
    if unit.weight is not None and unit.weight in tangents:
        assert u is not None
        w = tangents[unit.weight].to(g.dtype)
        t = w.shape[0]
        if unit.kind == "dense":
            y = torch.einsum("tde,nle->tnld", w.reshape(t, d, -1), u.to(g.dtype))
        elif unit.kind == "affine":
            y = w[:, None, None, :] * u.to(g.dtype)
        else:
            table = w.reshape(t, unit.taps, d)
            y = table[:, u.clamp_min(0)] * (u >= 0).to(g.dtype)[None, :, :, None]
    if unit.bias is not None and unit.bias in tangents:
        b = tangents[unit.bias].to(g.dtype)[:, None, None, :]
        y = b if y is None else y + b
    if y is None:
        return None
    return _expand_outputs(y.expand(y.shape[0], n, L, d), g)


def write_columns(unit: Unit, capture: UnitCapture, targets: dict[int, Tensor]) -> None:
    """Write the unit's Jacobian columns per example into ``targets[θ position]`` ``(n, C, numel)`` views.

    One-position dense weights are written as outer products straight into the target (the
    Jacobian is held once, not twice); other units through their per-example gradients.
    """
    g = capture.cotangents
    n, C, L, d = g.shape
    if unit.weight is not None and unit.weight in targets:
        target = targets[unit.weight]
        if unit.kind == "dense" and L == 1:
            assert capture.inputs is not None
            a = capture.inputs[:, 0]
            torch.mul(g[:, :, 0, :, None], a[:, None, None, :], out=target.view(n, C, d, a.shape[-1]))
        else:
            target.copy_(weight_gradients(unit, capture).reshape(n, C, -1))
    if unit.bias is not None and unit.bias in targets:
        torch.sum(g, 2, out=targets[unit.bias])


def unit_columns(unit: Unit, capture: UnitCapture) -> dict[int, Tensor]:
    """The unit's Jacobian columns per example as new tensors, ``{θ position: (n, C, numel)}``.

    The out-of-place twin of :func:`write_columns`, for differentiable captures (test inputs that
    require grad): autograd refuses ``out=`` and in-place writes through views made before them.
    """
    g = capture.cotangents
    n, C, L, d = g.shape
    out = {}
    if unit.weight is not None:
        if unit.kind == "dense" and L == 1:
            assert capture.inputs is not None
            a = capture.inputs[:, 0].to(g.dtype)
            out[unit.weight] = (g[:, :, 0, :, None] * a[:, None, None, :]).reshape(n, C, -1)
        else:
            out[unit.weight] = weight_gradients(unit, capture).reshape(n, C, -1)
    if unit.bias is not None:
        out[unit.bias] = g.sum(2)
    return out
