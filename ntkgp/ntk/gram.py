r"""NTK Gram matrices: per group, or summed with weights; structured units and generic tensors in one kernel.

.. math::
    K_g(X_1, X_2) = J_g(X_1) J_g(X_2)^\top \quad\text{(per group)},\qquad
    \sum_g w_g K_g(X_1, X_2) \quad\text{(with weights, e.g. } w_g = 1/\delta_g\text{)}.

Structured units (:mod:`ntkgp.structured`) contribute from their captures; one-position dense
units (``nn.Linear``) by the factored route of :mod:`ntkgp.structured.linear`, the others by the
gradient or spatial route of :mod:`ntkgp.structured.positions`. The remaining tensors contribute
by contracting chunked per-example Jacobians (:mod:`ntkgp.ntk.generic`). Both agree to
floating-point round-off (tested). Rows are point-major: row ``n * C + c`` is output ``c`` of
point ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk.captures import captures, captures_fit, rows_within
from ntkgp.ntk.engine import EmpiricalNTK
from ntkgp.ntk.generic import generic_gram
from ntkgp.structured.capture import UnitCapture
from ntkgp.structured.linear import linear_gram_weighted, linear_grams
from ntkgp.structured.plan import Unit
from ntkgp.structured.positions import positions_gram
from ntkgp.structured.workspace import Workspace

__all__ = ["gram", "structured_gram"]

#: Bytes for the blocks of structured units at many positions when the caller gives no budget.
_DEFAULT_STRUCTURED_BUDGET = 2**28


def structured_gram(
    ntk: EmpiricalNTK,
    captures1: list[UnitCapture],
    captures2: list[UnitCapture],
    out: Tensor,
    *,
    weights: Tensor | None = None,
    budget: int | None = None,
    units: Sequence[Unit] | None = None,
) -> None:
    r"""Add the structured units' NTK contributions to ``out``.

    ``captures1`` / ``captures2`` are the captures of ``x1`` (``N1`` points) and ``x2`` (``N2``
    points); passing the same list object twice means ``x1 = x2`` and uses symmetry. ``out`` is
    ``(G, N1*C, N2*C)`` (per group), or ``(N1*C, N2*C)`` with ``weights`` ``(G,)`` giving
    :math:`\sum_g w_g K_g` directly. Units at many positions use about ``budget`` bytes at a time.
    ``units`` restricts the sum to some of the plan's units (the captures are theirs, in order).
    """
    symmetric = captures1 is captures2
    budget = _DEFAULT_STRUCTURED_BUDGET if budget is None else budget
    workspace = Workspace()
    tensor_group = ntk.layout.tensor_group
    linear = []
    for unit, c1, c2 in zip(ntk.plan().units if units is None else units, captures1, captures2):
        if unit.is_linear:
            if weights is None:
                linear.append((unit, c1, c2))
            else:
                linear_gram_weighted(unit, tensor_group, c1, c2, out, weights)
        else:
            positions_gram(
                unit,
                tensor_group,
                c1,
                c2,
                out,
                weights,
                workspace,
                symmetric=symmetric,
                budget=budget,
                route=ntk.conv_route,
            )
    if linear:
        linear_grams(linear, tensor_group, out, workspace, symmetric=symmetric)


def _captures_fit(ntk: EmpiricalNTK, x1: Inputs, x2: Inputs | None, max_bytes: int) -> bool:
    """Whether the captures of ``x1`` and ``x2`` fit in ``max_bytes`` together."""
    if x2 is None:
        return captures_fit(ntk, x1, max_bytes)
    return captures_fit(ntk, x1, max_bytes // 2) and captures_fit(ntk, x2, max_bytes // 2)


def _tiled_structured_gram(
    ntk: EmpiricalNTK, x1: Inputs, x2: Inputs | None, out: Tensor, weights: Tensor | None
) -> None:
    r"""The structured units' part of :func:`gram` in tiles, when the captures of the inputs do not
    fit in half the budget (convolutions at many positions hold a few MB per example).

    Blocks of rows of ``x1`` and ``x2`` whose captures take a quarter of the budget each are
    captured one pair at a time: each block of ``x1`` once, the blocks of ``x2`` once per block of
    ``x1`` (above the diagonal only when ``x2`` is ``x1``). Memory stays within the budget; the
    price is :math:`b_1 b_2` capture passes instead of :math:`b_1 + b_2` (about half that when
    symmetric).
    """
    C, quarter = ntk.num_outputs, ntk.budget // 4
    symmetric = x2 is None
    other = x1 if x2 is None else x2
    rows = rows_within(ntk, x1, quarter)
    for s1, xa in ntk.network.chunks(x1, rows, desc="Gram tiles (captures beyond the budget)"):
        ca = captures(ntk, xa)
        rows1 = slice(s1 * C, (s1 + xa.num) * C)
        for s2, xb in other.chunks(rows):
            if symmetric and s2 < s1:
                continue
            same = symmetric and s2 == s1
            cb = ca if same else captures(ntk, xb)
            block = torch.zeros(*out.shape[:-2], xa.num * C, xb.num * C, dtype=out.dtype, device=out.device)
            structured_gram(ntk, ca, cb, block, weights=weights, budget=ntk.budget // 2)
            rows2 = slice(s2 * C, (s2 + xb.num) * C)
            out[..., rows1, rows2] += block
            if symmetric and not same:
                out[..., rows2, rows1] += block.mT


def gram(
    ntk: EmpiricalNTK,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    weights: Tensor | None = None,
    captures1: list[UnitCapture] | None = None,
    captures2: list[UnitCapture] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""NTK Grams between ``x1`` and ``x2`` (``None``: ``x2 = x1``, using symmetry).

    Returns ``(G, N1 C, N2 C)`` per group, or ``(N1 C, N2 C)`` :math:`\sum_g w_g K_g` with
    ``weights`` ``(G,)``, in ``dtype``. Captures already computed for ``x1`` or ``x2`` can be passed.
    ``budget`` bytes of the engine bound the generic Jacobian blocks and the structured blocks; when
    the captures of the inputs do not fit in half of it, the structured part is built in tiles.
    """
    C = ntk.num_outputs
    n2 = x1.num if x2 is None else x2.num
    shape = (x1.num * C, n2 * C) if weights is not None else (ntk.layout.num_groups, x1.num * C, n2 * C)
    out = torch.zeros(*shape, dtype=dtype, device=ntk.network.device)
    plan = ntk.plan(x1)
    half = ntk.budget // 2
    if plan.units and captures1 is None and captures2 is None and not _captures_fit(ntk, x1, x2, half):
        _tiled_structured_gram(ntk, x1, x2, out, weights)
    elif plan.units:
        c1 = captures(ntk, x1) if captures1 is None else captures1
        if x2 is None:
            c2 = c1
        else:
            c2 = captures(ntk, x2) if captures2 is None else captures2
        structured_gram(ntk, c1, c2, out, weights=weights, budget=ntk.budget)
    if plan.generic:
        generic_gram(ntk, x1, x2, out, plan.generic, weights=weights)
    return out
