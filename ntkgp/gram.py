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
    by estimated flops: **gradient** forms the per-example weight gradients
    :math:`\Gamma_{n,c} = G_{n,c}^\top U_n` (``d_out x d_in k``, cheap for small convs) and
    contracts them, :math:`2 C^2 d_{out} d_{in} k` per pair of points; **spatial** forms
    :math:`S_{nm} = U_n U_m^\top` ``(L, L)`` and :math:`K_W = \langle G_{n,c}, S_{nm} G_{m,d}\rangle`,
    :math:`2L^2 d_{in}k + 2L^2 C d_{out} + 2 L C^2 d_{out}` per pair (the spatial double sum in
    its cheapest order), better for few output positions and many channels.
* **Generic**: every other parameter tensor, by contracting chunked per-example Jacobians of
  just those tensors. At most two Jacobian blocks of ``budget / 2`` bytes are held at once.

Both agree to floating-point round-off (tested). Products run in the network's dtype and are
accumulated in float64. Row layout is point-major: row ``n * C + c`` is output ``c`` of point ``n``.
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
    for layer, f1, f2 in zip(network.structured_layers, factors1, factors2):
        if layer.kind == "linear":
            _linear_gram(layer, groups, f1, f2, out, weights)
        else:
            _conv_gram(layer, groups, f1, f2, out, weights, symmetric=symmetric, budget=budget)


def _add(out: Tensor, weights: Tensor | None, group: int, rows: slice, cols: slice, block: Tensor) -> None:
    """``out[group, rows, cols] += block``, or ``out[rows, cols] += weights[group] * block`` (float64 accumulation)."""
    if weights is None:
        out[group, rows, cols].add_(block)
    else:
        out[rows, cols].addcmul_(block, weights[group].to(out.dtype))


def _linear_gram(
    layer: StructuredLayer, groups: ParameterGroups, f1: tuple[Tensor, Tensor], f2: tuple[Tensor, Tensor],
    out: Tensor, weights: Tensor | None,
) -> None:
    r"""``nn.Linear``: :math:`K_W = (A_1 A_2^\top) \otimes_{\text{rows}} (G_1 G_2^\top)`, :math:`K_b = G_1 G_2^\top`.

    The ``(N1, N2)`` input Gram is broadcast over the outputs through ``(N1, C, N2, C)`` views,
    never expanded; a bias in the weight's group is fused in as :math:`G_1G_2^\top\circ(A_1A_2^\top + 1)`.
    """
    (a1, g1), (a2, g2) = f1, f2
    n1, C, d_out = g1.shape
    n2 = g2.shape[0]
    # shape: (n1*C, d_out) @ (d_out, n2*C) -> (n1, C, n2, C), in the network's dtype
    gg = (g1.reshape(n1 * C, d_out) @ g2.reshape(n2 * C, d_out).T).view(n1, C, n2, C)

    def target(group: int) -> Tensor:
        return (out[group] if weights is None else out).view(n1, C, n2, C)

    bias_pending = layer.bias is not None
    if layer.weight is not None:
        gw = groups.tensor_group[layer.weight]
        aa = (a1 @ a2.T).to(out.dtype)  # shape: (n1, n2)
        if weights is not None:
            aa = aa * weights[gw].to(out.dtype)
        if layer.bias is not None and (weights is not None or groups.tensor_group[layer.bias] == gw):
            aa = aa + (1.0 if weights is None else weights[groups.tensor_group[layer.bias]].to(out.dtype))
            bias_pending = False
        target(gw).addcmul_(gg, aa[:, None, :, None])
    if bias_pending:
        assert layer.bias is not None
        gb = groups.tensor_group[layer.bias]
        if weights is None:
            target(gb).add_(gg)
        else:
            target(gb).addcmul_(gg, weights[gb].to(out.dtype))


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
    out: Tensor, weights: Tensor | None, *, symmetric: bool, budget: int,
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
        _add(out, weights, groups.tensor_group[layer.bias], every, every, s1 @ s2.T)
    if layer.weight is None:
        return
    gw = groups.tensor_group[layer.weight]
    item, half = g1.element_size(), budget // 2
    sides = ((u1, g1), (u2, g2))
    if _conv_route(u1, g1, n1, n2, symmetric) == "gradient":
        width = d_out * t
        # a block of `rows` points holds rows*C*width gradient entries and a (rows*C, n2*C) product
        rows = max(1, half // (C * max(width, n2 * C) * item))
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
            _add(out, weights, gw, slice(s1 * C, e1 * C), slice(s2 * C, e2 * C), k)
            if symmetric and s2 != s1:  # the mirrored block of K = K^T
                _add(out, weights, gw, slice(s2 * C, e2 * C), slice(s1 * C, e1 * C), k.T)


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
