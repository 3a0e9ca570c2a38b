r"""Structured Grams of maps applied at many positions: convolutions, sequence-wise ``F.linear``,
embeddings and the affine parameters of normalization layers.

With per-example inputs :math:`u_{n,l}` and output cotangents :math:`g_{n,c,l}` at positions
:math:`l` (:mod:`ntkgp.structured.capture`), the per-example weight gradient is

* dense (``z = W u + b``): :math:`\Gamma_{n,c} = \sum_l g_{n,c,l} u_{n,l}^\top` (``d_out x t``);
* embedding (``u`` one-hot): :math:`\Gamma_{n,c}[v] = \sum_{l:\,\mathrm{id}_{n,l}=v} g_{n,c,l}`, rows of ``V x d``;
* affine (``z = \hat x \odot w + b``): :math:`\Gamma_{n,c} = \sum_l g_{n,c,l}\odot\hat x_{n,l}` (``d``);

and every bias has :math:`\sum_l g_{n,c,l}`. The weight block of the NTK,
:math:`K_W[(n,c),(m,d)] = \langle\Gamma_{n,c},\Gamma_{m,d}\rangle`, has two exact evaluation
orders, picked per unit by estimated cost (:func:`conv_route_costs`) unless a route is forced:

* **gradient**: form the :math:`\Gamma_{n,c}` and contract them in one GEMM,
  :math:`2 C^2 d_{out} t` per pair of points (cheap for small maps, always used for affine units);
* **spatial**: :math:`\sum_{l,l'} (u_{n,l}\cdot u_{m,l'})(g_{n,c,l}\cdot g_{m,d,l'})`, from the
  ``L x L`` products of inputs (for embeddings, token equality) and of cotangents,
  :math:`2L^2 t + 2C^2L^2 d_{out}` flops plus :math:`C^2L^2` memory-bound products per pair;
  better for few positions and many channels (late conv layers) and for large vocabularies.

Products run in the network's dtype and are accumulated in float64. For a float32 network the
gradient route contracts :math:`\Gamma` in panels of 4096 columns summed in float64
(:func:`~ntkgp.structured.workspace.gram_product`: an entry is within
:math:`4096\cdot 2^{-24}\sqrt{k_{aa}k_{bb}}` of the float64 product of the same gradients). The
spatial route's products have inner dimensions :math:`t` and :math:`d_{out}`, and its sum over the
:math:`L_1 L_2` position pairs runs in float32 too: an error of about
:math:`(\max(t, d_{out}) + L_1L_2)\,2^{-24}` relative to the sum of the absolute terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ntkgp.structured.capture import UnitCapture
from ntkgp.structured.plan import Unit
from ntkgp.structured.workspace import Workspace, add_block, block_rows, gram_product

__all__ = [
    "Route",
    "bias_gradients",
    "choose_route",
    "conv_route_costs",
    "positions_diagonal",
    "positions_gram",
    "weight_gradients",
]

#: ``"auto"`` (cheaper by :func:`conv_route_costs`), ``"gradient"`` or ``"spatial"``.
Route = Literal["auto", "gradient", "spatial"]

#: flops charged per entry of the spatial route's elementwise product-and-sum, which is bound by
#: memory traffic rather than arithmetic (about 64 matches CPU measurements against the GEMMs)
_HADAMARD_FLOPS = 64.0


def conv_route_costs(
    positions: int, taps: int, d_out: int, outputs: int, n1: int, n2: int, *, symmetric: bool = False
) -> dict[str, float]:
    r"""Estimated cost (flops) of a weight block ``(n1*C, n2*C)`` by each exact route.

    With ``L = positions``, ``t = taps``, ``C = outputs``:

    * ``"gradient"``: form :math:`\Gamma_{n,c}` for every point, :math:`2 C L d_{out} t` each, then
      one Gram product, :math:`2 C^2 d_{out} t` per pair;
    * ``"spatial"``: per pair, :math:`u\cdot u'` (:math:`2L^2t`) and :math:`g\cdot g'` for all
      ``c, d`` (:math:`2C^2L^2d_{out}`), both from two large GEMMs, then their elementwise product
      summed over :math:`l, l'` (:math:`C^2L^2` entries, each charged ``_HADAMARD_FLOPS``).
    """
    L, t, C = positions, taps, outputs
    points = n1 if symmetric else n1 + n2
    pairs = n1 * n2 / (2 if symmetric else 1)
    return {
        "gradient": 2.0 * C * L * d_out * t * points + 2.0 * C * C * d_out * t * pairs,
        "spatial": pairs * (2.0 * L * L * t + 2.0 * C * C * L * L * d_out + _HADAMARD_FLOPS * C * C * L * L),
    }


def choose_route(unit: Unit, outputs: int, n1: int, n2: int, symmetric: bool, route: Route) -> str:
    """The route for ``unit``'s weight block: forced, ``"gradient"`` for affine units, else the cheaper."""
    if unit.kind == "affine":
        return "gradient"
    if route != "auto":
        return route
    costs = conv_route_costs(unit.positions, unit.taps, unit.width, outputs, n1, n2, symmetric=symmetric)
    return min(costs, key=costs.__getitem__)


def bias_gradients(capture: UnitCapture) -> Tensor:
    r""":math:`\sum_l g_{n,c,l}`, ``(n*C, d_out)``."""
    g = capture.cotangents
    return g.sum(2).reshape(g.shape[0] * g.shape[1], g.shape[-1])


def weight_gradients(unit: Unit, capture: UnitCapture) -> Tensor:
    r"""Per-example weight gradients :math:`\Gamma_{n,c}`, flattened in the weight's layout, ``(n*C, numel)``."""
    u, g = capture.inputs, capture.cotangents
    assert u is not None
    n, C, L, d = g.shape
    if unit.kind == "affine":
        if g.stride(-1) != 1:  # channel-major storage (a capture's own layout): contract positions in place
            return torch.einsum("ncdl,ndl->ncd", g.transpose(2, 3), u.to(g.dtype).transpose(1, 2)).reshape(n * C, d)
        return torch.einsum("ncld,nld->ncd", g, u.to(g.dtype)).reshape(n * C, d)
    if unit.kind == "embedding":
        vocab = unit.taps
        valid = (u >= 0).reshape(-1)
        rows = (torch.arange(n, device=u.device)[:, None] * vocab + u.clamp_min(0)).reshape(-1)[valid]
        # shape: (n, C, L, d) -> (n*L, C, d), scattered into (n*V, C, d)
        values = g.permute(0, 2, 1, 3).reshape(n * L, C, d)[valid]
        grads = torch.zeros(n * vocab, C, d, dtype=g.dtype, device=g.device).index_add_(0, rows, values)
        return grads.reshape(n, vocab, C, d).permute(0, 2, 1, 3).reshape(n * C, vocab * d)
    # shape: (n, C*d_out, L) @ (n, L, t) -> (n, C*d_out, t)
    return torch.bmm(g.transpose(2, 3).reshape(n, C * d, L), u.to(g.dtype)).reshape(n * C, d * u.shape[-1])


def _input_products(unit: Unit, u1: Tensor, u2: Tensor) -> Tensor:
    r""":math:`u_{n,l}\cdot u_{m,l'}`, ``(n1, L1, n2, L2)``: a GEMM, or token equality for embeddings."""
    if unit.kind == "embedding":
        same = (u1[:, :, None, None] == u2[None, None]) & (u1 >= 0)[:, :, None, None]
        return same.to(torch.float64)
    n1, L1, t = u1.shape
    n2, L2 = u2.shape[:2]
    return (u1.reshape(n1 * L1, t) @ u2.reshape(n2 * L2, t).T).view(n1, L1, n2, L2)


def _self_products(unit: Unit, u: Tensor) -> Tensor:
    r""":math:`u_{n,l}\cdot u_{n,l'}` per example, ``(n, L, L)``."""
    if unit.kind == "embedding":
        return ((u[:, :, None] == u[:, None, :]) & (u >= 0)[:, :, None]).to(torch.float64)
    return torch.bmm(u, u.transpose(1, 2))


def _spatial_block(unit: Unit, c1: UnitCapture, c2: UnitCapture) -> Tensor:
    r"""Weight block :math:`\sum_{l,l'} (u_{n,l}\cdot u_{m,l'})(g_{n,c,l}\cdot g_{m,d,l'})`, ``(n1*C, n2*C)``."""
    assert c1.inputs is not None and c2.inputs is not None
    g1, g2 = c1.cotangents, c2.cotangents
    n1, C, L1, d_out = g1.shape
    n2, _, L2, _ = g2.shape
    s = _input_products(unit, c1.inputs, c2.inputs).to(g1.dtype).view(n1, 1, L1, n2, 1, L2)
    # shape: (n1*C*L1, d_out) @ (d_out, n2*C*L2) -> (n1, C, L1, n2, C, L2)
    gg = (g1.reshape(n1 * C * L1, d_out) @ g2.reshape(n2 * C * L2, d_out).T).view(n1, C, L1, n2, C, L2)
    gg = gg * s if torch.is_grad_enabled() and (gg.requires_grad or s.requires_grad) else gg.mul_(s)
    return gg.sum((2, 5)).reshape(n1 * C, n2 * C)


def positions_gram(
    unit: Unit,
    tensor_group: Sequence[int],
    c1: UnitCapture,
    c2: UnitCapture,
    out: Tensor,
    weights: Tensor | None,
    workspace: Workspace,
    *,
    symmetric: bool,
    budget: int,
    route: Route = "auto",
) -> None:
    """One unit into ``out``: bias block from position-summed cotangents, weight block by a route, in blocks."""
    g1 = c1.cotangents
    n1, C, L, d_out = g1.shape
    n2 = c2.cotangents.shape[0]
    every = slice(None)
    if unit.bias is not None:
        b1 = bias_gradients(c1)
        b2 = b1 if symmetric else bias_gradients(c2)
        add_block(out, weights, tensor_group[unit.bias], every, every, b1 @ b2.T, workspace)
    if unit.weight is None:
        return
    gw = tensor_group[unit.weight]
    item, half = g1.element_size(), budget // 2
    sides = (c1, c2)
    chosen = choose_route(unit, C, n1, n2, symmetric, route)
    if chosen == "gradient":
        width = d_out * unit.taps
        # a block of `rows` points holds rows*C*width gradient entries and a (rows*C, n2*C) product
        rows = max(1, half // (C * max(width, n2 * C) * item))
        if symmetric:
            rows = min(rows, block_rows(n1, C, width))
        # the right-hand gradients are formed once if they fit (the left ones too when x1 = x2)
        whole = weight_gradients(unit, c2) if n2 * C * width * item <= half else None

        def prepare(side: int, start: int, stop: int) -> tuple[Tensor, ...]:
            if whole is not None and (side == 1 or symmetric):
                return (whole[start * C : stop * C],)
            return (weight_gradients(unit, sides[side][start:stop]),)

        def product(left: tuple[Tensor, ...], right: tuple[Tensor, ...]) -> Tensor:
            return gram_product(left[0], right[0], workspace)  # shape: (r1*C, r2*C)
    else:
        # a block of rows x rows points holds u u^T (L^2 per pair) and g g^T (C^2 L^2 per pair)
        rows = max(1, math.isqrt(max(1, half // ((L * L + C * C * L * L) * item))))

        def prepare(side: int, start: int, stop: int) -> tuple[Tensor, ...]:
            return (sides[side][start:stop],)  # type: ignore[return-value]

        def product(left: tuple[Tensor, ...], right: tuple[Tensor, ...]) -> Tensor:
            return _spatial_block(unit, left[0], right[0])  # type: ignore[arg-type]

    for s1 in range(0, n1, rows):
        e1 = min(s1 + rows, n1)
        left = prepare(0, s1, e1)
        for s2 in range(0, n2, rows):
            if symmetric and s2 > s1:
                break
            e2 = min(s2 + rows, n2)
            right = left if symmetric and s2 == s1 else prepare(1, s2, e2)
            k = product(left, right)
            add_block(out, weights, gw, slice(s1 * C, e1 * C), slice(s2 * C, e2 * C), k, workspace)
            if symmetric and s2 != s1:  # the mirrored block of K = K^T
                add_block(out, weights, gw, slice(s2 * C, e2 * C), slice(s1 * C, e1 * C), k.T, workspace)


def positions_diagonal(
    unit: Unit, tensor_group: Sequence[int], capture: UnitCapture, out: Tensor, budget: int, route: Route = "auto"
) -> None:
    r"""Add the unit's per-group :math:`\|J_g(x_n)_c\|^2` to ``out`` ``(G, n*C)``."""
    g = capture.cotangents
    n, C, L, d_out = g.shape
    if unit.bias is not None:
        out[tensor_group[unit.bias]] += bias_gradients(capture).to(torch.float64).square().sum(-1)
    if unit.weight is None:
        return
    gw = tensor_group[unit.weight]
    # per point: the gradient and its squares, or u u^T, g g^T per output and their product
    chosen = choose_route(unit, C, 1, 1, True, route)
    per_example = C * d_out * unit.taps if chosen == "gradient" else L * L + 2 * C * L * L
    rows = max(1, budget // (2 * per_example * g.element_size()))
    for s in range(0, n, rows):
        part = capture[s : s + rows]
        m = part.num
        sl = slice(s * C, (s + m) * C)
        if chosen == "gradient":
            out[gw, sl] += weight_gradients(unit, part).to(torch.float64).square().sum(-1)
        else:
            assert part.inputs is not None
            uu = _self_products(unit, part.inputs)  # shape: (m, L, L)
            flat = part.cotangents.reshape(m * C, L, d_out)
            gg = torch.bmm(flat, flat.transpose(1, 2)).view(m, C, L, L)  # shape: (m, C, L, L)
            uu = uu.to(gg.dtype).unsqueeze(1)
            gg = gg * uu if torch.is_grad_enabled() and (gg.requires_grad or uu.requires_grad) else gg.mul_(uu)
            out[gw, sl] += gg.sum((-2, -1)).reshape(-1).to(torch.float64)
