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
from ntkgp.structured.linear import linear_diagonal, linear_point_blocks
from ntkgp.structured.positions import positions_diagonal

__all__ = ["gram_diagonal", "point_blocks"]

#: points per diagonal block of the structured Gram used for point blocks of units at many positions
_POINT_BLOCK = 64


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
    :math:`(w_W\lVert a_n\rVert^2 + w_b)\, g_n g_n^\top`; other units through the diagonal blocks of
    their structured Gram on ``64`` points at a time; generic tensors from their per-example
    Jacobian (``generic_jacobian_cols``, ``(N, C, P_t)``, when the caller has it already).
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
        rest = [i for i, u in enumerate(plan.units) if not u.is_linear]
        if rest:
            units = [plan.units[i] for i in rest]
            for start in range(0, n, _POINT_BLOCK):
                part = [caps[i][start : start + _POINT_BLOCK] for i in rest]
                r = part[0].num
                block = torch.zeros(r * C, r * C, dtype=torch.float64, device=out.device)
                structured_gram(ntk, part, part, block, weights=weights, units=units)
                out[start : start + r] += block.reshape(r, C, r, C).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    if plan.generic:
        jac = generic_jacobian(ntk, x, plan.generic) if generic_jacobian_cols is None else generic_jacobian_cols
        scale = _column_weights(ntk, plan.generic, weights).to(jac.dtype)
        out += torch.einsum("ncp,ndp->ncd", jac * scale, jac).to(torch.float64)
    return out


def _column_weights(ntk: EmpiricalNTK, tensors: tuple[int, ...], weights: Tensor) -> Tensor:
    """The group weight of every column of ``tensors``' Jacobian, ``(P_t,)``."""
    return torch.cat([weights[g].expand(stop - start) for g, start, stop in ntk.layout.column_ranges(tensors)])
