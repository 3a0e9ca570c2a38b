r"""Cross-Grams of many blocks of inputs against fixed reference inputs whose operands are held.

The inducing-point solvers contract every chunk :math:`X_c` of the training inputs with the same ``M``
inducing inputs :math:`Z`, per prior group: :math:`K^g(X_c, Z)`; and they need each chunk's per-point
``C x C`` blocks :math:`K^g(x_n, x_n)` (for the trace terms). :class:`ReferenceOperands` holds :math:`Z`'s
operands (:mod:`ntkgp.ntk.tiles`): the per-example weight gradients :math:`\Gamma` of every unit whose
weight block takes the gradient route, even where they are larger than the unit's captures (they are
formed once and contracted with every chunk), the captures of the other units, and the Jacobian of the
generic tensors. :meth:`ReferenceOperands.products` then takes one capture pass over a chunk, forms the
chunk's gradients once, and returns both its cross-Gram and its per-point blocks from them.

Without it each chunk formed :math:`Z`'s gradients again (from held captures) and the per-point blocks
took a second capture pass over the training data, once per prior group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk.captures import captures
from ntkgp.ntk.diagonal import group_blocks, point_blocks
from ntkgp.ntk.engine import EmpiricalNTK
from ntkgp.ntk.generic import generic_jacobian
from ntkgp.ntk.gram import gram
from ntkgp.ntk.tiles import FLOAT32_PANEL, OperandLayout, Operands, operand_gram, operand_layout, operands
from ntkgp.structured.capture import UnitCapture
from ntkgp.structured.plan import Unit
from ntkgp.structured.workspace import Workspace

__all__ = ["ChunkProducts", "ReferenceOperands", "chunk_products", "reference_bytes"]


@dataclass(frozen=True)
class ChunkProducts:
    """What one chunk of ``n`` inputs contributes: per-group cross-Grams against the reference inputs
    ``cross`` ``(G, n C, M C)`` and, when asked for, per-group per-point blocks ``blocks`` ``(G, n, C, C)``,
    both float64."""

    cross: Tensor
    blocks: Tensor | None


def _layout(ntk: EmpiricalNTK, reference: Inputs, rows: int) -> OperandLayout:
    return operand_layout(ntk, rows, reference.num, False, reused=True)


def reference_bytes(ntk: EmpiricalNTK, reference: Inputs, rows: int) -> int:
    """Bytes :class:`ReferenceOperands` holds for ``reference`` against chunks of ``rows`` inputs."""
    plan, item = ntk.plan(), ntk.network.dtype.itemsize
    total = reference.num * _layout(ntk, reference, rows).entries * item if plan.units else 0
    if plan.generic:
        total += reference.num * ntk.num_outputs * ntk.layout.width(plan.generic) * item
    return total


def _one_hot(ntk: EmpiricalNTK, g: int) -> Tensor:
    weights = torch.zeros(ntk.layout.num_groups, dtype=torch.float64, device=ntk.network.device)
    weights[g] = 1.0
    return weights


def _gradient_blocks(gradients: Tensor, n: int, C: int) -> Tensor:
    r"""Per-point :math:`\Gamma_n\Gamma_n^\top` ``(n, C, C)`` of ``gradients`` ``(n C, w)``, float64 (float32
    gradients in panels of :data:`~ntkgp.ntk.tiles.FLOAT32_PANEL` columns summed in float64, as the Grams)."""
    rows = gradients.view(n, C, -1)
    if gradients.dtype == torch.float64:
        return torch.bmm(rows, rows.mT)
    out = torch.zeros(n, C, C, dtype=torch.float64, device=gradients.device)
    for start in range(0, rows.shape[-1], FLOAT32_PANEL):
        panel = rows[..., start : start + FLOAT32_PANEL]
        out += torch.bmm(panel, panel.mT).to(torch.float64)
    return out


def _generic_products(ntk: EmpiricalNTK, jac: Tensor, reference_jacobian: Tensor | None, out: ChunkProducts) -> None:
    """Add the generic tensors' cross-Gram (against ``reference_jacobian`` ``(M C, P_t)``) and per-point
    blocks of a chunk's Jacobian ``jac`` ``(n, C, P_t)`` to ``out``."""
    flat = jac.reshape(-1, jac.shape[-1])
    columns, start = [], 0
    for g, a, b in ntk.layout.column_ranges(ntk.plan().generic):
        columns.append((g, start, start + b - a))
        start += b - a
    for g, a, b in columns:
        if reference_jacobian is not None:
            out.cross[g] += (flat[:, a:b] @ reference_jacobian[:, a:b].T).to(torch.float64)
        if out.blocks is not None:
            part = jac[..., a:b]
            out.blocks[g] += torch.bmm(part, part.mT).to(torch.float64)


class ReferenceOperands:
    """Fixed reference inputs held as operands, for cross-Grams and per-point blocks of many chunks.

    Parameters
    ----------
    ntk:
        The products engine.
    reference:
        The reference inputs :math:`Z` (``M`` of them).
    rows:
        The largest chunk :meth:`products` will be given (it sets the routes, as for any Gram).
    """

    def __init__(self, ntk: EmpiricalNTK, reference: Inputs, rows: int) -> None:
        self.ntk, self.reference = ntk, reference
        plan = ntk.plan()
        #: which units are held as gradients, which as captures (``None`` without structured units)
        self.layout = _layout(ntk, reference, rows) if plan.units else None
        #: the reference inputs' operands
        self.operands: Operands | None = None if self.layout is None else operands(ntk, reference, self.layout)
        #: the reference inputs' generic Jacobian ``(M C, P_t)``, or ``None``
        self.jacobian = (
            generic_jacobian(ntk, reference, plan.generic).reshape(-1, ntk.layout.width(plan.generic))
            if plan.generic
            else None
        )

    def products(self, x: Inputs, *, blocks: bool) -> ChunkProducts:
        """Cross-Grams of ``x`` against the reference inputs and (``blocks``) its per-point blocks, per
        group, from one capture pass over ``x``."""
        ntk = self.ntk
        G, C, device = ntk.layout.num_groups, ntk.num_outputs, ntk.network.device
        out = ChunkProducts(
            torch.zeros(G, x.num * C, self.reference.num * C, dtype=torch.float64, device=device),
            torch.zeros(G, x.num, C, C, dtype=torch.float64, device=device) if blocks else None,
        )
        if self.layout is not None:
            assert self.operands is not None
            chunk = operands(ntk, x, self.layout)
            operand_gram(ntk, self.layout, chunk, self.operands, out.cross, None, Workspace())
            if out.blocks is not None:
                _operand_blocks(ntk, self.layout, chunk, out.blocks)
        if self.jacobian is not None:
            _generic_products(ntk, generic_jacobian(ntk, x, ntk.plan().generic), self.jacobian, out)
        return out


def _operand_blocks(ntk: EmpiricalNTK, layout: OperandLayout, chunk: Operands, out: Tensor) -> None:
    """Add the per-group per-point blocks of the operands ``chunk`` to ``out`` ``(G, n, C, C)``."""
    C, n = ntk.num_outputs, chunk.num
    for g, width in enumerate(layout.widths):
        if width:
            out[g] += _gradient_blocks(chunk.gradients[g], n, C)
    units, group = ntk.plan().units, ntk.layout.tensor_group
    for u, capture in zip(layout.captured, chunk.captures):
        _unit_blocks(ntk, units[u], capture, out, group)


def _unit_blocks(ntk: EmpiricalNTK, unit: Unit, capture: UnitCapture, out: Tensor, group: Sequence[int]) -> None:
    """Add one unit's per-point blocks to ``out`` ``(G, n, C, C)``, per group of its tensors."""
    for g in sorted({group[t] for t in unit.tensors}):
        group_blocks(ntk, unit, capture, _one_hot(ntk, g), capture.num, 1, out[g])


def chunk_products(
    ntk: EmpiricalNTK,
    x: Inputs,
    reference: Inputs,
    *,
    blocks: bool,
    held: ReferenceOperands | None = None,
    reference_captures: list[UnitCapture] | None = None,
) -> ChunkProducts:
    """:meth:`ReferenceOperands.products` with ``held``; without it (the reference operands do not fit),
    the same from one capture pass over ``x``, with the reference inputs' captures ``reference_captures``
    when held (else they are recaptured) and the blocks per group from the chunk's captures."""
    if held is not None:
        return held.products(x, blocks=blocks)
    plan, G = ntk.plan(), ntk.layout.num_groups
    caps = captures(ntk, x) if plan.units else None
    cross = gram(ntk, x, reference, captures1=caps, captures2=reference_captures)
    out = None
    if blocks:
        jac = generic_jacobian(ntk, x, plan.generic) if plan.generic else None
        out = torch.stack(
            [point_blocks(ntk, x, _one_hot(ntk, g), captured=caps, generic_jacobian_cols=jac) for g in range(G)]
        )
    return ChunkProducts(cross, out)
