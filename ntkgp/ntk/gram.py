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

from ntkgp.linalg.symmetric_gram import mirror_lower
from ntkgp.network.inputs import Inputs
from ntkgp.ntk.captures import captures
from ntkgp.ntk.engine import EmpiricalNTK
from ntkgp.ntk.generic import generic_gram
from ntkgp.ntk.tiles import tiled_gram
from ntkgp.structured.capture import UnitCapture, differentiable
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
    ``weights`` ``(G,)``, in ``dtype``. Captures already computed for ``x1`` or ``x2`` can be passed
    (or are held by the engine's cache): the structured part is then built from them. Otherwise it is
    built by :func:`~ntkgp.ntk.tiles.tiled_gram`, from tiles of per-example weight gradients that
    hold at most half of the engine's ``budget``, each example of a tile captured once. ``budget``
    also bounds the generic Jacobian blocks.
    """
    C = ntk.num_outputs
    n2 = x1.num if x2 is None else x2.num
    shape = (x1.num * C, n2 * C) if weights is not None else (ntk.layout.num_groups, x1.num * C, n2 * C)
    out = torch.zeros(*shape, dtype=dtype, device=ntk.network.device)
    plan = ntk.plan(x1)
    if plan.units:
        held1 = captures1 if captures1 is not None else ntk.captures.get(x1)
        held2 = captures2 if captures2 is not None or x2 is None else ntk.captures.get(x2)
        graph = differentiable(x1) or (x2 is not None and differentiable(x2))
        if held1 is None and held2 is None and not graph:
            tiled_gram(ntk, x1, x2, out, weights)
        else:
            c1 = captures(ntk, x1) if held1 is None else held1
            if x2 is None:
                c2 = c1
            else:
                c2 = captures(ntk, x2) if held2 is None else held2
            structured_gram(ntk, c1, c2, out, weights=weights, budget=ntk.budget)
    if plan.generic:
        generic_gram(ntk, x1, x2, out, plan.generic, weights=weights)
    if x2 is None:
        mirror_lower(out)  # diagonal blocks of GEMMs are symmetric only up to the BLAS kernel's round-off
    return out
