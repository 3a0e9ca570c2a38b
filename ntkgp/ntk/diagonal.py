r"""Diagonals of the NTK: per-group :math:`\lVert J_g(x_n)_c\rVert^2`, and per-point ``C x C`` blocks.

Both need memory linear in the number of points: structured units from their captures, chunk
by chunk; generic tensors from chunked per-example Jacobians.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk.captures import capture_rows, captures
from ntkgp.ntk.engine import EmpiricalNTK
from ntkgp.ntk.generic import generic_diagonal, generic_jacobian
from ntkgp.ntk.gram import structured_gram
from ntkgp.structured.capture import UnitCapture
from ntkgp.structured.linear import linear_diagonal, linear_point_blocks, two_d
from ntkgp.structured.plan import Unit
from ntkgp.structured.positions import bias_gradients, positions_diagonal, weight_gradients

__all__ = ["gram_diagonal", "group_blocks", "point_blocks"]


def _group_gram(rows: Tensor, groups: int) -> Tensor:
    """``rows`` ``(B q C, w)`` -> per-group Grams ``(B, qC, qC)``, float64."""
    flat = rows.reshape(groups, -1, rows.shape[-1])
    return (flat @ flat.mT).to(torch.float64)


def group_blocks(
    ntk: EmpiricalNTK, unit: Unit, capture: UnitCapture, weights: Tensor, groups: int, q: int, out: Tensor
) -> None:
    r"""Add one structured unit's :math:`\sum_g w_g K_g` within consecutive groups of ``q`` points to
    ``out`` ``(B, qC, qC)`` (``q = 1``: the per-point ``C x C`` blocks).

    Dense units factor as :math:`(w_W a_i\cdot a_j + w_b)\, g_i g_j^\top`; other units use their
    per-example weight gradients (``n C`` rows of the weight's size) when those fit in half the
    budget, else the unit's structured Gram group by group. Cost is linear in the number of groups.
    """
    C, group = ntk.num_outputs, ntk.layout.tensor_group
    if unit.is_linear:  # (w_W a_i.a_j + w_b) g_ic.g_jd, in float64 as the linear Gram routes
        a, g = two_d(capture)
        gg = _group_gram(g.to(torch.float64).reshape(-1, g.shape[-1]), groups).view(groups, q, C, q, C)
        term = torch.zeros((), dtype=torch.float64, device=out.device)
        if unit.bias is not None:
            term = weights[group[unit.bias]]
        if unit.weight is not None:
            assert a is not None
            aa = _group_gram(a.to(torch.float64), groups)  # shape: (B, q, q)
            term = (weights[group[unit.weight]] * aa + term)[:, :, None, :, None]
        out += (gg * term).reshape(out.shape)
        return
    width = 0 if unit.weight is None else unit.width * unit.taps
    if capture.num * C * width * capture.cotangents.element_size() > ntk.budget // 2:
        # the per-example weight gradients do not fit: the unit's own Gram routes, group by group
        for b in range(groups):
            part = [capture[b * q : (b + 1) * q]]
            block = torch.zeros(q * C, q * C, dtype=torch.float64, device=out.device)
            structured_gram(ntk, part, part, block, weights=weights, units=[unit])
            out[b] += block
        return
    if unit.bias is not None:
        out += weights[group[unit.bias]] * _group_gram(bias_gradients(capture), groups)
    if unit.weight is not None:
        out += weights[group[unit.weight]] * _group_gram(weight_gradients(unit, capture), groups)


def gram_diagonal(ntk: EmpiricalNTK, x: Inputs) -> Tensor:
    r"""Per-group diagonals :math:`\lVert J_g(x_n)_c\rVert^2`, ``(G, N C)``, float64."""
    C = ntk.num_outputs
    out = torch.zeros(ntk.layout.num_groups, x.num * C, dtype=torch.float64, device=ntk.network.device)
    plan = ntk.plan(x)
    tensor_group = ntk.layout.tensor_group
    if plan.units:
        for start, xc in ntk.network.chunks(x, capture_rows(ntk, x), desc="NTK diagonal (structured)"):
            sl = slice(start * C, (start + xc.num) * C)
            for unit, cap in zip(plan.units, captures(ntk, xc)):
                if unit.is_linear:
                    linear_diagonal(unit, tensor_group, cap, out[:, sl])
                else:
                    positions_diagonal(unit, tensor_group, cap, out[:, sl], ntk.budget, ntk.conv_route)
    if plan.generic:
        generic_diagonal(ntk, x, out, plan.generic)
    return out


def point_blocks(
    ntk: EmpiricalNTK,
    x: Inputs,
    weights: Tensor,
    *,
    captured: list[UnitCapture] | None = None,
    generic_jacobian_cols: Tensor | None = None,
) -> Tensor:
    r"""Per-point ``C x C`` blocks of :math:`\sum_g w_g K_g(x, x)`, ``(N, C, C)``, float64.

    One-position dense units in one batched product,
    :math:`(w_W\lVert a_n\rVert^2 + w_b)\, g_n g_n^\top`; other units from their per-example weight
    gradients, :math:`\Gamma_n \Gamma_n^\top` (:func:`group_blocks` with ``q = 1``); generic tensors
    from their per-example Jacobian (``generic_jacobian_cols``, ``(N, C, P_t)``, when the caller has it already).
    """
    n, C = x.num, ntk.num_outputs
    plan = ntk.plan(x)
    out = torch.zeros(n, C, C, dtype=torch.float64, device=ntk.network.device)
    weights = weights.to(torch.float64)
    if plan.units:
        caps = captures(ntk, x) if captured is None else captured
        tensor_group = ntk.layout.tensor_group
        linear = [(u, c) for u, c in zip(plan.units, caps) if u.is_linear]
        for unit, cap in linear:
            out += linear_point_blocks(unit, tensor_group, cap, weights)
        for unit, cap in zip(plan.units, caps):
            if unit.is_linear:
                continue
            # per-example weight gradients, in chunks whose gradients take a quarter of the budget
            width = max(1, (0 if unit.weight is None else unit.width * unit.taps) + unit.width)
            rows = max(1, ntk.budget // (4 * C * width * cap.cotangents.element_size()))
            for start in range(0, n, rows):
                part = cap[start : start + rows]
                group_blocks(ntk, unit, part, weights, part.num, 1, out[start : start + part.num])
    if plan.generic:
        jac = generic_jacobian(ntk, x, plan.generic) if generic_jacobian_cols is None else generic_jacobian_cols
        scale = _column_weights(ntk, plan.generic, weights).to(jac.dtype)
        out += torch.einsum("ncp,ndp->ncd", jac * scale, jac).to(torch.float64)
    return out


def _column_weights(ntk: EmpiricalNTK, tensors: tuple[int, ...], weights: Tensor) -> Tensor:
    """The group weight of every column of ``tensors``' Jacobian, ``(P_t,)``."""
    return torch.cat([weights[g].expand(stop - start) for g, start, stop in ntk.layout.column_ranges(tensors)])
