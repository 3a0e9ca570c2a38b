r"""Chunked contractions of network Jacobians: per-group NTK Grams, their diagonals, and
:math:`J^\top J`.

Two routes, combined in one kernel (issue "fast exact NTK"):

* **Structured** (layers of :attr:`FunctionalNetwork.structured_layers`), from per-layer factors
  (:meth:`FunctionalNetwork.structured_factors`); per-example Jacobians of the network are never
  formed.

  - ``nn.Linear``: with layer inputs :math:`A` ``(N, d_in)`` and output cotangents :math:`G_c`
    ``(N, d_out)``,

    .. math::
        K_W[(n,c),(m,d)] = (a_n\cdot a_m)\,(g_{n,c}\cdot g_{m,d}),\qquad
        K_b[(n,c),(m,d)] = g_{n,c}\cdot g_{m,d},

    costing :math:`N^2 C^2 (d_{in} + d_{out})` instead of :math:`N^2 C^2 d_{in} d_{out}`.
  - ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``): with unfolded input patches :math:`U_n`
    ``(L, d_in k)`` (``L`` output positions, ``k`` kernel taps) and output cotangents
    :math:`G_{n,c}` ``(L, d_out)``, :math:`\partial f_c(x_n)/\partial W = G_{n,c}^\top U_n` and

    .. math::
        K_W[(n,c),(m,d)] = \langle G_{n,c}^\top U_n,\, G_{m,d}^\top U_m\rangle_F
          = \sum_{l,l'} (u_{n,l}\cdot u_{m,l'})\,(g_{n,c,l}\cdot g_{m,d,l'}),\qquad
        K_b[(n,c),(m,d)] = \Big(\sum_l g_{n,c,l}\Big)\cdot\Big(\sum_{l'} g_{m,d,l'}\Big).

    The weight block has two exact evaluation orders (:func:`conv_route_costs`), picked per layer
    by estimated cost: **gradient** forms the per-example weight gradients
    :math:`\Gamma_{n,c} = G_{n,c}^\top U_n` (``d_out x d_in k``, cheap for small convs) and
    contracts them in one GEMM, :math:`2 C^2 d_{out} d_{in} k` per pair of points; **spatial**
    forms :math:`U_n U_m^\top` and :math:`G_{n,c} G_{m,d}^\top` (``L x L``, from two large GEMMs)
    and sums their elementwise product over :math:`l, l'`,
    :math:`2L^2 d_{in}k + 2 C^2 L^2 d_{out}` flops plus :math:`C^2L^2` memory-bound products per
    pair, better for few output positions and many channels (late layers).

  A symmetric Gram (``x2 = x1``) is built from the lower block triangle only (4 row blocks: 62.5%
  of the GEMM work) and mirrored.
* **Generic**: every other parameter tensor, by contracting chunked per-example Jacobians of
  just those tensors. At most two Jacobian blocks of ``budget / 2`` bytes are held at once.

Both agree to floating-point round-off (tested). ``nn.Linear`` factor products run in float64
(cheap, and they set the accuracy of float32 networks); conv and generic products run in the
network's dtype and are accumulated in float64. Row layout is point-major: row ``n * C + c`` is
output ``c`` of point ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ntkgp.functional import FunctionalNetwork, StructuredLayer
from ntkgp.parameter_groups import ParameterGroups

__all__ = [
    "conv_route_costs",
    "jacobian_outer_products",
    "ntk_gram",
    "ntk_gram_diagonal",
    "structured_gram",
    "subset_ranges",
]

Factors = list[tuple[Tensor, Tensor]]

#: Bytes for the blocks of structured conv layers when the caller gives no budget (two held at once).
_DEFAULT_STRUCTURED_BUDGET = 2**28
#: ``"gradient"`` or ``"spatial"`` forces that conv route (tests); ``None`` picks the cheaper one.
_FORCE_CONV_ROUTE: str | None = None


def subset_ranges(groups: ParameterGroups, numels: Sequence[int], tensors: Sequence[int]) -> list[tuple[int, int, int]]:
    """Merged ``(group, start, stop)`` column ranges of the Jacobian of ``tensors`` (in that order)."""
    ranges: list[tuple[int, int, int]] = []
    start = 0
    for t in tensors:
        stop, g = start + numels[t], groups.tensor_group[t]
        if ranges and ranges[-1][0] == g and ranges[-1][2] == start:
            ranges[-1] = (g, ranges[-1][1], stop)
        else:
            ranges.append((g, start, stop))
        start = stop
    return ranges


def structured_gram(
    network: FunctionalNetwork,
    groups: ParameterGroups,
    factors1: Factors,
    factors2: Factors,
    out: Tensor,
    *,
    weights: Tensor | None = None,
) -> None:
    r"""Add the structured layers' NTK contributions to ``out`` (see the module docstring).

    ``factors1`` / ``factors2`` come from :meth:`FunctionalNetwork.structured_factors` (alias
    ``linear_layer_factors``) of inputs ``x1`` (``N1`` points) and ``x2`` (``N2`` points); passing the
    same list object twice means ``x1 = x2`` and uses symmetry. ``out`` is ``(G, N1*C, N2*C)`` (per
    group), or ``(N1*C, N2*C)`` with ``weights`` ``(G,)`` giving :math:`\sum_g w_g K_g` directly.
    Conv blocks use about ``2**28`` bytes at a time.
    """
    _structured_gram(network, groups, factors1, factors2, out, weights=weights, budget=_DEFAULT_STRUCTURED_BUDGET)


def _structured_gram(
    network: FunctionalNetwork,
    groups: ParameterGroups,
    factors1: Factors,
    factors2: Factors,
    out: Tensor,
    *,
    weights: Tensor | None,
    budget: int,
) -> None:
    symmetric = factors1 is factors2
    workspace = _Workspace()
    linear = []
    for layer, f1, f2 in zip(network.structured_layers, factors1, factors2):
        if layer.kind == "linear":
            if weights is None:
                linear.append((layer, f1, f2))
            else:
                _linear_gram_weighted(layer, groups, f1, f2, out, weights)
        else:
            _conv_gram(layer, groups, f1, f2, out, weights, workspace, symmetric=symmetric, budget=budget)
    if linear:
        _linear_grams(linear, groups, out, workspace, symmetric=symmetric)


#: entries converted at a time by :func:`_accumulate` (16 MiB of float64)
_CONVERT_ELEMENTS = 2**21


class _Workspace:
    """Scratch buffers reused across layers: a fresh large allocation page-faults on every use."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer of at least ``numel`` entries (contents undefined)."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def matmul(self, key: str, left: Tensor, right: Tensor) -> Tensor:
        """``left @ right`` written into a reused buffer."""
        buf = self.get(key, left.shape[0] * right.shape[1], left.dtype, left.device)
        return torch.mm(left, right, out=buf[: left.shape[0] * right.shape[1]].view(left.shape[0], right.shape[1]))


def _accumulate(target: Tensor, source: Tensor, workspace: _Workspace) -> None:
    """``target += source``; a lower-precision ``source`` is cast through a reused buffer, in row blocks.

    (In-place arithmetic with mixed dtypes is several times slower on CPU than a cast plus a
    same-dtype add; the cast is exact, so the result is the same.)
    """
    if source.dtype == target.dtype:
        target.add_(source)
        return
    inner = max(1, source[0].numel()) if source.shape[0] else 1
    rows = max(1, _CONVERT_ELEMENTS // inner)
    buf = workspace.get("convert", min(rows, source.shape[0]) * inner, target.dtype, target.device)
    for start in range(0, source.shape[0], rows):
        part = source[start : start + rows]
        converted = buf[: part.numel()].view(part.shape)
        converted.copy_(part)
        target[start : start + rows].add_(converted)


def _add(
    out: Tensor, weights: Tensor | None, group: int, rows: slice, cols: slice, block: Tensor, workspace: _Workspace
) -> None:
    """``out[group, rows, cols] += block``, or ``out[rows, cols] += weights[group] * block`` (float64 accumulation)."""
    if weights is None:
        _accumulate(out[group, rows, cols], block, workspace)
    else:
        out[rows, cols].addcmul_(block.to(out.dtype), weights[group].to(out.dtype))


def _linear_gram_weighted(
    layer: StructuredLayer, groups: ParameterGroups, f1: tuple[Tensor, Tensor], f2: tuple[Tensor, Tensor],
    out: Tensor, weights: Tensor,
) -> None:
    r"""One ``nn.Linear`` into ``out`` ``(N1*C, N2*C)``: :math:`G_1G_2^\top\circ(w_W A_1A_2^\top + w_b)`.

    The ``(N1, N2)`` input Gram is combined in float64 and broadcast over the outputs through
    ``(N1, C, N2, C)`` views, never expanded.
    """
    (a1, g1), (a2, g2) = ((t.to(out.dtype) for t in f) for f in (f1, f2))  # float64 products, as above
    n1, C, d_out = g1.shape
    n2 = g2.shape[0]
    # shape: (n1*C, d_out) @ (d_out, n2*C) -> (n1, C, n2, C)
    gg = (g1.reshape(n1 * C, d_out) @ g2.reshape(n2 * C, d_out).T).view(n1, C, n2, C)
    term = torch.zeros((), dtype=out.dtype, device=out.device)
    if layer.bias is not None:
        term = weights[groups.tensor_group[layer.bias]].to(out.dtype)
    if layer.weight is not None:  # shape: (n1, n2) -> (n1, 1, n2, 1)
        term = ((a1 @ a2.T).to(out.dtype) * weights[groups.tensor_group[layer.weight]].to(out.dtype) + term)
        term = term[:, None, :, None]
    out.view(n1, C, n2, C).addcmul_(gg, term)


def _linear_grams(
    layers: list[tuple[StructuredLayer, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]],
    groups: ParameterGroups, out: Tensor, workspace: _Workspace, *, symmetric: bool,
) -> None:
    r"""All ``nn.Linear`` layers into the per-group ``out`` ``(G, N1*C, N2*C)``, block by block.

    Per block of points and per layer: :math:`K_W = (A_1A_2^\top) \circ (G_1G_2^\top)` and
    :math:`K_b = G_1G_2^\top` (the input Gram broadcast over outputs through ``(r1, C, r2, C)``
    views, never expanded); a bias in its weight's group is fused in as
    :math:`\tilde A = [A, 1]`, :math:`\tilde A_1\tilde A_2^\top = A_1A_2^\top + 1`. Everything is in
    float64 (``out``'s dtype); the block is added to ``out`` (and mirrored when symmetric). Few large operations
    per block keep this fast also when the CPU is shared.
    """
    n1, C = layers[0][1][1].shape[:2]
    n2 = layers[0][2][1].shape[0]
    prepared = []
    for layer, f1, f2 in layers:
        # Factor products in float64 (``out``'s dtype) whatever the network's dtype: for a float32
        # 8-256-256-1 MLP (N = 1000) float32 GEMMs put a relative 2.5e-4 error on the predictive
        # variances and 2e-5 on the evidence; float64 GEMMs of the same factors, 3e-7 and 1e-7.
        (a1, g1), (a2, g2) = ((t.to(out.dtype) for t in f) for f in (f1, f2))
        gw = None if layer.weight is None else groups.tensor_group[layer.weight]
        gb = None if layer.bias is None else groups.tensor_group[layer.bias]
        fuse = gw is not None and gb == gw
        if fuse:  # shape: (n, d_in) -> (n, d_in + 1)
            a1 = torch.cat([a1, torch.ones_like(a1[:, :1])], 1)
            a2 = a1 if symmetric else torch.cat([a2, torch.ones_like(a2[:, :1])], 1)
        d_out = g1.shape[-1]
        # shape: (n, C, d_out) -> (n*C, d_out)
        prepared.append((gw, None if fuse else gb, a1, a2, g1.reshape(n1 * C, d_out), g2.reshape(n2 * C, d_out)))
    rows = _block_rows(n1, C)
    for block in _pair_blocks(n1, n2, rows, symmetric):
        s1, e1, s2, e2 = block
        acc: dict[int, Tensor] = {}  # group -> its sum over layers, (r1, C, r2, C) in out's dtype
        for gw, gb, a1, a2, g1, g2 in prepared:
            # shape: (r1*C, d_out) @ (d_out, r2*C) -> (r1, C, r2, C)
            gg = workspace.matmul("gg", g1[s1 * C : e1 * C], g2[s2 * C : e2 * C].T).view(e1 - s1, C, e2 - s2, C)
            if gb is not None:
                _sum_into(acc, gb, gg, None, workspace)
            if gw is not None:
                aa = workspace.matmul("aa", a1[s1:e1], a2[s2:e2].T)  # shape: (r1, r2)
                _sum_into(acc, gw, gg, aa[:, None, :, None], workspace)
        for group, values in acc.items():
            _emit(out[group].view(n1, C, n2, C), block, values, symmetric, workspace)


def _sum_into(acc: dict[int, Tensor], group: int, gg: Tensor, aa: Tensor | None, workspace: _Workspace) -> None:
    """``acc[group] += gg`` (``aa`` None) or ``+= gg * aa``, the first term written into a reused buffer."""
    if group not in acc:
        buf = workspace.get(f"acc{group}", gg.numel(), gg.dtype, gg.device)[: gg.numel()].view(gg.shape)
        acc[group] = buf.copy_(gg) if aa is None else torch.mul(gg, aa, out=buf)
    elif aa is None:
        acc[group].add_(gg)
    else:
        acc[group].addcmul_(gg, aa)


def _emit(
    target: Tensor, block: tuple[int, int, int, int], values: Tensor, symmetric: bool, workspace: _Workspace
) -> None:
    """Add ``values`` ``(r1, C, r2, C)`` to ``target`` ``(n1, C, n2, C)`` at ``block``, and its mirror if symmetric."""
    s1, e1, s2, e2 = block
    mirror = symmetric and s1 != s2
    if values.dtype != target.dtype:  # cast once (in place mixed-dtype arithmetic is slow on CPU)
        values = workspace.get("convert", values.numel(), target.dtype, target.device)[: values.numel()].view(
            values.shape).copy_(values)
    target[s1:e1, :, s2:e2].add_(values)
    if mirror:
        target[s2:e2, :, s1:e1].add_(values.permute(2, 3, 0, 1))


#: Structured Grams are built in about this many row blocks of points (k); a symmetric Gram
#: (x1 = x2) from its lower block triangle, (k + 1) / 2k of the full GEMM work (k = 4: 62.5%), the
#: mirror blocks being copies. Blocks keep at least _MIN_BLOCK_ROWS GEMM rows (points times
#: outputs): large products, and few operations in all (each costs a thread synchronization).
_SYMMETRIC_BLOCKS = 4
_MIN_BLOCK_ROWS = 1024


def _block_rows(n: int, outputs: int) -> int:
    """Points per row block of a structured Gram of ``n`` rows of points."""
    return max(1, -(-_MIN_BLOCK_ROWS // outputs), -(-n // _SYMMETRIC_BLOCKS))


def _pair_blocks(n1: int, n2: int, rows: int, symmetric: bool) -> list[tuple[int, int, int, int]]:
    """Blocks ``(s1, e1, s2, e2)`` of ``rows`` points covering ``(n1, n2)``; symmetric: only ``s2 <= s1``."""
    return [(s1, min(s1 + rows, n1), s2, min(s2 + rows, n2))
            for s1 in range(0, n1, rows) for s2 in range(0, n2, rows) if not (symmetric and s2 > s1)]


#: flops charged per entry of the spatial route's elementwise product-and-sum, which is bound by
#: memory traffic rather than arithmetic (about 64 matches CPU measurements against the GEMMs)
_HADAMARD_FLOPS = 64.0


def conv_route_costs(
    positions: int, taps: int, d_out: int, outputs: int, n1: int, n2: int, *, symmetric: bool = False
) -> dict[str, float]:
    r"""Estimated cost (flops) of a conv layer's weight block ``(n1*C, n2*C)`` by each exact route.

    With ``L = positions``, ``t = taps`` (:math:`d_{in} k`), ``C = outputs``:

    * ``"gradient"``: form :math:`\Gamma_{n,c} = G_{n,c}^\top U_n` for every point,
      :math:`2 C L d_{out} t` each, then one Gram product, :math:`2 C^2 d_{out} t` per pair;
    * ``"spatial"``: per pair, :math:`U_n U_m^\top` (:math:`2L^2t`) and
      :math:`G_{n,c} G_{m,d}^\top` for all ``c, d`` (:math:`2C^2L^2d_{out}`), both from two large
      GEMMs, then their elementwise product summed over :math:`l, l'` (:math:`C^2L^2` entries, each
      charged ``_HADAMARD_FLOPS``).

    The cheaper estimate is used. Gradient wins for many output positions (early, wide-image
    layers); spatial for few positions and many channels (late layers).
    """
    L, t, C = positions, taps, outputs
    points = n1 if symmetric else n1 + n2
    pairs = n1 * n2 / (2 if symmetric else 1)
    return {
        "gradient": 2.0 * C * L * d_out * t * points + 2.0 * C * C * d_out * t * pairs,
        "spatial": pairs * (2.0 * L * L * t + 2.0 * C * C * L * L * d_out + _HADAMARD_FLOPS * C * C * L * L),
    }


def _conv_route(u: Tensor, g: Tensor, n1: int, n2: int, symmetric: bool) -> str:
    if _FORCE_CONV_ROUTE is not None:
        return _FORCE_CONV_ROUTE
    _, C, L, d_out = g.shape
    costs = conv_route_costs(L, u.shape[-1], d_out, C, n1, n2, symmetric=symmetric)
    return min(costs, key=costs.__getitem__)


def _weight_gradients(u: Tensor, g: Tensor) -> Tensor:
    r"""Per-example conv weight gradients :math:`\Gamma_{n,c} = G_{n,c}^\top U_n`, flattened.

    Shape: ``u`` ``(n, L, t)``, ``g`` ``(n, C, L, d_out)`` -> ``(n*C, d_out*t)``.
    """
    n, C, L, d_out = g.shape
    # shape: (n, C*d_out, L) @ (n, L, t) -> (n, C*d_out, t)
    return torch.bmm(g.transpose(2, 3).reshape(n, C * d_out, L), u).reshape(n * C, d_out * u.shape[-1])


def _spatial_block(u1: Tensor, g1: Tensor, u2: Tensor, g2: Tensor) -> Tensor:
    r"""Conv weight block :math:`\sum_{l,l'} (u_{n,l}\cdot u_{m,l'})(g_{n,c,l}\cdot g_{m,d,l'})`, ``(n1*C, n2*C)``."""
    n1, L, t = u1.shape
    n2, C, _, d_out = g2.shape
    # shape: (n1*L, t) @ (t, n2*L) -> s (n1, 1, L, n2, 1, L): s[n, l, m, l'] = u_{n,l} . u_{m,l'}
    s = (u1.reshape(n1 * L, t) @ u2.reshape(n2 * L, t).T).view(n1, 1, L, n2, 1, L)
    # shape: (n1*C*L, d_out) @ (d_out, n2*C*L) -> (n1, C, L, n2, C, L): g_{n,c,l} . g_{m,d,l'}
    gg = (g1.reshape(n1 * C * L, d_out) @ g2.reshape(n2 * C * L, d_out).T).view(n1, C, L, n2, C, L)
    return gg.mul_(s).sum((2, 5)).reshape(n1 * C, n2 * C)


def _conv_gram(
    layer: StructuredLayer, groups: ParameterGroups, f1: tuple[Tensor, Tensor], f2: tuple[Tensor, Tensor],
    out: Tensor, weights: Tensor | None, workspace: _Workspace, *, symmetric: bool, budget: int,
) -> None:
    """Conv layer: bias block from position-summed cotangents; weight block by the cheaper route, in blocks."""
    (u1, g1), (u2, g2) = f1, f2
    n1, C, L, d_out = g1.shape
    n2, t = g2.shape[0], u1.shape[-1]
    every = slice(None)
    if layer.bias is not None:
        # shape: (n, C, L, d_out) -> (n*C, d_out)
        s1 = g1.sum(2).reshape(n1 * C, d_out)
        s2 = s1 if symmetric else g2.sum(2).reshape(n2 * C, d_out)
        _add(out, weights, groups.tensor_group[layer.bias], every, every, s1 @ s2.T, workspace)
    if layer.weight is None:
        return
    gw = groups.tensor_group[layer.weight]
    item, half = g1.element_size(), budget // 2
    sides = ((u1, g1), (u2, g2))
    if _conv_route(u1, g1, n1, n2, symmetric) == "gradient":
        width = d_out * t
        # a block of `rows` points holds rows*C*width gradient entries and a (rows*C, n2*C) product
        rows = max(1, half // (C * max(width, n2 * C) * item))
        if symmetric:
            rows = min(rows, _block_rows(n1, C))
        # the right-hand gradients are formed once if they fit (the left ones too when x1 = x2)
        whole = _weight_gradients(u2, g2) if n2 * C * width * item <= half else None

        def prepare(side: int, start: int, stop: int) -> tuple[Tensor, ...]:
            if whole is not None and (side == 1 or symmetric):
                return (whole[start * C : stop * C],)
            u, g = sides[side]
            return (_weight_gradients(u[start:stop], g[start:stop]),)

        def product(left: tuple[Tensor, ...], right: tuple[Tensor, ...]) -> Tensor:
            return left[0] @ right[0].T  # shape: (r1*C, r2*C)
    else:
        # a block of rows x rows points holds U U^T (L^2 per pair) and G G^T (C^2 L^2 per pair)
        rows = max(1, math.isqrt(max(1, half // ((L * L + C * C * L * L) * item))))

        def prepare(side: int, start: int, stop: int) -> tuple[Tensor, ...]:
            u, g = sides[side]
            return u[start:stop], g[start:stop]

        def product(left: tuple[Tensor, ...], right: tuple[Tensor, ...]) -> Tensor:
            return _spatial_block(*left, *right)  # shape: (r1*C, r2*C)

    for s1 in range(0, n1, rows):
        e1 = min(s1 + rows, n1)
        left = prepare(0, s1, e1)
        for s2 in range(0, n2, rows):
            if symmetric and s2 > s1:
                break
            e2 = min(s2 + rows, n2)
            right = left if symmetric and s2 == s1 else prepare(1, s2, e2)
            k = product(left, right)
            _add(out, weights, gw, slice(s1 * C, e1 * C), slice(s2 * C, e2 * C), k, workspace)
            if symmetric and s2 != s1:  # the mirrored block of K = K^T
                _add(out, weights, gw, slice(s2 * C, e2 * C), slice(s1 * C, e1 * C), k.T, workspace)


def _structured_diagonal(
    layer: StructuredLayer, groups: ParameterGroups, factors: tuple[Tensor, Tensor], out: Tensor, budget: int
) -> None:
    r"""Add one structured layer's per-group :math:`\|J_g(x_n)_c\|^2` to ``out`` ``(G, n*C)``."""
    a, g = factors
    if layer.kind == "linear":
        C = g.shape[1]
        g_sq = g.to(torch.float64).square().sum(-1).reshape(-1)  # shape: (n*C,)
        if layer.bias is not None:
            out[groups.tensor_group[layer.bias]] += g_sq
        if layer.weight is not None:
            a_sq = a.to(torch.float64).square().sum(-1).repeat_interleave(C)
            out[groups.tensor_group[layer.weight]] += a_sq * g_sq
        return
    n, C, L, d_out = g.shape
    t = a.shape[-1]
    if layer.bias is not None:
        out[groups.tensor_group[layer.bias]] += g.sum(2).to(torch.float64).square().sum(-1).reshape(-1)
    if layer.weight is None:
        return
    gw = groups.tensor_group[layer.weight]
    # per point: Gamma (2 C L d_out t) and its squares, or U U^T, G G^T per output and their product
    gradient_cost = 2.0 * C * L * d_out * t + 2.0 * C * d_out * t
    spatial_cost = 2.0 * L * L * t + 2.0 * C * L * L * d_out + _HADAMARD_FLOPS * C * L * L
    route = _FORCE_CONV_ROUTE or ("gradient" if gradient_cost <= spatial_cost else "spatial")
    per_example = C * d_out * t if route == "gradient" else L * L + 2 * C * L * L
    rows = max(1, budget // (2 * per_example * g.element_size()))
    for s in range(0, n, rows):
        ub, gb = a[s : s + rows], g[s : s + rows]
        sl = slice(s * C, (s + ub.shape[0]) * C)
        if route == "gradient":
            out[gw, sl] += _weight_gradients(ub, gb).to(torch.float64).square().sum(-1)
        else:
            m = ub.shape[0]
            uu = torch.bmm(ub, ub.transpose(1, 2))  # shape: (m, L, L)
            flat = gb.reshape(m * C, L, d_out)
            gg = torch.bmm(flat, flat.transpose(1, 2)).view(m, C, L, L)  # shape: (m, C, L, L)
            out[gw, sl] += gg.mul_(uu.unsqueeze(1)).sum((-2, -1)).reshape(-1).to(torch.float64)


def _generic_gram(
    network: FunctionalNetwork, groups: ParameterGroups, x1: Tensor, x2: Tensor | None, out: Tensor, budget: int,
    tensors: Sequence[int],
) -> None:
    symmetric = x2 is None
    x2 = x1 if x2 is None else x2
    C = network.num_outputs
    width = sum(network.numels[t] for t in tensors)
    ranges = subset_ranges(groups, network.numels, tensors)
    rows = max(1, budget // (2 * C * width * network.dtype.itemsize))

    def accumulate(r1: slice, r2: slice, left: Tensor, right: Tensor) -> None:
        for g, start, stop in ranges:
            out[g, r1, r2] += (left[:, start:stop] @ right[:, start:stop].T).to(out.dtype)

    for s1, xb in network.chunks(x1, rows, desc="NTK Gram"):
        left = network.jacobian_block(xb, tensors).reshape(-1, width)
        r1 = slice(s1 * C, s1 * C + left.shape[0])
        for s2 in range(0, x2.shape[0], rows):
            if symmetric and s2 > s1:
                break
            same = symmetric and s2 == s1
            right = left if same else network.jacobian_block(x2[s2 : s2 + rows], tensors).reshape(-1, width)
            r2 = slice(s2 * C, s2 * C + right.shape[0])
            accumulate(r1, r2, left, right)
            if symmetric and not same:
                out[:, r2, r1] = out[:, r1, r2].transpose(-1, -2)


def ntk_gram(
    network: FunctionalNetwork,
    groups: ParameterGroups,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    budget: int,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Per-group NTK Gram matrices :math:`K_g = J_g(x_1) J_g(x_2)^\top`.

    Parameters
    ----------
    x1, x2:
        Inputs ``(N1, D)`` and ``(N2, D)``; ``x2=None`` means ``x2 = x1`` and uses symmetry.
    budget:
        Bytes for Jacobian blocks of the generic route (two are held at once), and for the
        per-example-gradient / spatial blocks of structured conv layers.

    Returns
    -------
    Tensor
        Shape ``(G, N1 * C, N2 * C)``, in ``dtype``.
    """
    C = network.num_outputs
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    out = torch.zeros(groups.num_groups, x1.shape[0] * C, n2 * C, dtype=dtype, device=network.device)
    if network.structured_layers:
        f1 = network.structured_factors(x1)
        f2 = f1 if x2 is None else network.structured_factors(x2)
        _structured_gram(network, groups, f1, f2, out, weights=None, budget=budget)
    if network.generic_tensors:
        _generic_gram(network, groups, x1, x2, out, budget, network.generic_tensors)
    return out


def ntk_gram_diagonal(
    network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, *, budget: int
) -> Tensor:
    r"""Per-group diagonals :math:`\|J_g(x_n)_c\|^2`, shape ``(G, N * C)``, float64."""
    C = network.num_outputs
    out = torch.zeros(groups.num_groups, x.shape[0] * C, dtype=torch.float64, device=network.device)
    if network.structured_layers:
        for start, xc in network.chunks(x, network.factor_chunk_size(), desc="NTK diagonal (structured)"):
            sl = slice(start * C, (start + xc.shape[0]) * C)
            for layer, factors in zip(network.structured_layers, network.structured_factors(xc)):
                _structured_diagonal(layer, groups, factors, out[:, sl], budget)
    tensors = network.generic_tensors
    if tensors:
        width = sum(network.numels[t] for t in tensors)
        ranges = subset_ranges(groups, network.numels, tensors)
        rows = max(1, budget // (2 * C * width * network.dtype.itemsize))
        for start, xb in network.chunks(x, rows, desc="NTK diagonal"):
            jac = network.jacobian_block(xb, tensors).reshape(-1, width)
            sl = slice(start * C, start * C + jac.shape[0])
            for g, a, b in ranges:
                out[g, sl] += jac[:, a:b].to(torch.float64).square().sum(-1)
    return out


def jacobian_outer_products(
    network: FunctionalNetwork, x: Tensor, *, per_output: bool, budget: int, hessian_factor: Tensor | None = None
) -> Tensor:
    r""":math:`J^\top J` accumulated over data in float64.

    Returns shape ``(C, P, P)`` with :math:`J_c^\top J_c` per output ``c`` if ``per_output``,
    else ``(1, P, P)`` with :math:`\sum_c J_c^\top J_c`. With ``hessian_factor`` ``B``
    ``(N, C, C)``, each example's Jacobian is replaced by :math:`B_n^\top J_n`, giving the GGN
    :math:`J^\top \Lambda J = \sum_n J_n^\top B_n B_n^\top J_n`.
    """
    P, C = network.num_parameters, network.num_outputs
    out = torch.zeros(C if per_output else 1, P, P, dtype=torch.float64, device=network.device)
    rows = max(1, budget // (2 * network.jacobian_bytes_per_example()))
    for start, jac in network.iter_jacobians(x, rows, desc="J^T J"):
        jac = jac.to(torch.float64)  # shape: (n, C, P)
        if hessian_factor is not None:
            jac = torch.einsum("nca,ncp->nap", hessian_factor[start : start + jac.shape[0]], jac)
        if per_output:
            out += torch.einsum("ncp,ncq->cpq", jac, jac)
        else:
            flat = jac.reshape(-1, P)
            out[0] += flat.T @ flat
    return out
