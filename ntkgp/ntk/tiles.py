r"""Structured Grams from inputs in tiles of held per-example weight gradients, each tile captured once.

A structured unit on the gradient route (:mod:`ntkgp.structured.positions`) contributes
:math:`\Gamma_1\Gamma_2^\top` to the Gram, :math:`\Gamma` its per-example weight (and bias) gradients
``(n C, numel)``. Its captures (patches and ``C`` output cotangents at every position) are often
larger than :math:`\Gamma`. :func:`tiled_gram` therefore holds, per block of examples, *operands*
(:class:`Operands`): the gradients of the units on the gradient route whose gradients are not larger
than their captures, packed per prior group, and the captures of the other units (one-position
``nn.Linear`` units, whose factored route needs only their inputs and cotangents; embeddings; units on
the spatial route; units with many channels at few positions). A CIFAR ResNet-20 in float64 holds
8.7 MiB per example this way, against 44 MiB of captures. Each operand is formed once, straight after
the capture pass of its chunk.

**Tiles.** Rows of :math:`X_1` are held a tile at a time (operands within half the budget); the
examples of :math:`X_2` are streamed past each tile in small chunks, each captured, turned into
operands, contracted and dropped. With :math:`R` examples per tile, a symmetric Gram of :math:`N`
examples takes :math:`N + \sum_i (N - iR)` example captures (about :math:`N + N^2/2R`), and only the
tiles on and above the diagonal are computed; the row tile's own block uses its lower block triangle.
When all of :math:`X_1` fits in one tile every example is captured once.

**Precision.** Products run in the network's dtype and are accumulated in float64 (``out``). A
float64 network is float64 throughout. For a float32 network the gradient columns of a group are
contracted in panels of at most :data:`FLOAT32_PANEL` columns, each panel's float32 product converted
and summed in float64, so a Gram entry :math:`k = \sum_{p} a_p^\top b_p` has error at most

.. math::
    |\hat k - k| \le \gamma_K \sum_p \lVert a_p\rVert\,\lVert b_p\rVert
    \le \gamma_K \sqrt{k_{aa}\,k_{bb}},\qquad \gamma_K \approx K\,2^{-24},\ K = \mathrm{FLOAT32\_PANEL}

(the standard bound for a float32 dot product of length :math:`K`, plus the Cauchy-Schwarz
inequality over panels; the float64 sums add :math:`O(2^{-53})`). With :math:`K = 4096` that is
:math:`2.4\times 10^{-4}` of :math:`\sqrt{k_{aa}k_{bb}}` in the worst case; rounding errors of
opposite signs make the typical error about :math:`\sqrt{K}\,2^{-24} = 3.8\times10^{-6}` of it
(tested against the float64 product of the same gradients;
:func:`~ntkgp.structured.workspace.gram_product`, which the gradient route of units held as captures
uses too). This is the precision the float32 network's own gradients have: every entry of
:math:`\Gamma` is already rounded to float32 by the backward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk.captures import capture_rows, captures, rows_within
from ntkgp.ntk.engine import EmpiricalNTK
from ntkgp.structured.capture import UnitCapture
from ntkgp.structured.positions import bias_gradients, choose_route, weight_gradients
from ntkgp.structured.workspace import FLOAT32_PANEL, Workspace, add_block, block_rows, gram_product

__all__ = [
    "FLOAT32_PANEL",
    "OperandLayout",
    "Operands",
    "operand_gram",
    "operand_layout",
    "operands",
    "operands_of",
    "streamed_cross",
    "tile_rows",
    "tiled_gram",
]


@dataclass(frozen=True)
class OperandLayout:
    """Which units are held as gradients (and in which columns of their group's matrix), which as captures.

    ``columns[g]`` lists ``(unit index, is the weight, start, stop)`` for group ``g``; ``widths[g]`` is
    the number of columns of group ``g``'s gradient matrix; ``captured`` the indices of the units held
    as captures; ``entries`` the entries held per example.
    """

    columns: tuple[tuple[tuple[int, bool, int, int], ...], ...]
    widths: tuple[int, ...]
    captured: tuple[int, ...]
    entries: int


def operand_layout(ntk: EmpiricalNTK, n1: int, n2: int, symmetric: bool, *, reused: bool = False) -> OperandLayout:
    """The operands of a ``(n1, n2)`` Gram: a unit is held as gradients when its weight block takes the
    gradient route (:func:`~ntkgp.structured.positions.choose_route`) and its gradients are not larger
    than its captures (``reused``: whatever their size, for operands contracted with many blocks, whose
    gradients would otherwise be formed for each); one-position units and embeddings keep their captures."""
    plan, C = ntk.plan(), ntk.num_outputs
    group, numels = ntk.layout.tensor_group, ntk.network.numels
    columns: list[list[tuple[int, bool, int, int]]] = [[] for _ in range(ntk.layout.num_groups)]
    widths = [0] * ntk.layout.num_groups
    captured, entries = [], 0
    for u, unit in enumerate(plan.units):
        inputs = unit.positions * (1 if unit.kind == "embedding" else unit.taps) if unit.weight is not None else 0
        capture_entries = inputs + C * unit.positions * unit.width
        gradient_entries = C * sum(numels[t] for t in unit.tensors)
        held = (
            not unit.is_linear
            and unit.kind != "embedding"
            and (unit.weight is None or choose_route(unit, C, n1, n2, symmetric, ntk.conv_route) == "gradient")
            and (reused or gradient_entries <= capture_entries)
        )
        if not held:
            captured.append(u)
            entries += capture_entries
            continue
        for t, is_weight in ((unit.weight, True), (unit.bias, False)):
            if t is not None:
                g = group[t]
                columns[g].append((u, is_weight, widths[g], widths[g] + numels[t]))
                widths[g] += numels[t]
        entries += gradient_entries
    return OperandLayout(tuple(tuple(c) for c in columns), tuple(widths), tuple(captured), max(1, entries))


@dataclass(frozen=True)
class Operands:
    """What a block of ``num`` examples contributes to a structured Gram (see the module docstring):
    ``gradients[g]`` ``(num C, widths[g])`` and the captures of the layout's ``captured`` units."""

    num: int
    gradients: tuple[Tensor, ...]
    captures: tuple[UnitCapture, ...]


def _held(ntk: EmpiricalNTK, num: int, layout: OperandLayout) -> tuple[Tensor, ...]:
    network = ntk.network
    return tuple(
        torch.empty(num * ntk.num_outputs, w, dtype=network.dtype, device=network.device) if w else torch.empty(0)
        for w in layout.widths
    )


def _fill(
    ntk: EmpiricalNTK, layout: OperandLayout, gradients: tuple[Tensor, ...], start: int, caps: list[UnitCapture]
) -> None:
    """Write the gradients of the captures ``caps`` of examples ``start, ...`` into the held matrices."""
    C, units = ntk.num_outputs, ntk.plan().units
    rows = slice(start * C, (start + caps[0].num) * C) if caps else slice(0, 0)
    for g, cols in enumerate(layout.columns):
        for u, is_weight, a, b in cols:
            part = weight_gradients(units[u], caps[u]) if is_weight else bias_gradients(caps[u])
            gradients[g][rows, a:b].copy_(part)


def operands(
    ntk: EmpiricalNTK,
    x: Inputs,
    layout: OperandLayout,
    each: Callable[[int, Inputs, list[UnitCapture]], None] | None = None,
) -> Operands:
    """The operands of ``x``: one capture pass per chunk of examples (:func:`capture_rows`, and captures
    within a quarter of the budget), each chunk's gradients written into the held matrices at once (the
    captures of gradient units are dropped). ``each(start, chunk, its captures)`` is called per chunk
    before they are dropped (for what else the caller takes from them)."""
    chunk = min(capture_rows(ntk, x), rows_within(ntk, x, ntk.budget // 4))
    gradients = _held(ntk, x.num, layout)
    kept: list[list[UnitCapture]] = []
    for start, xc in ntk.network.chunks(x, chunk):
        caps = captures(ntk, xc)
        _fill(ntk, layout, gradients, start, caps)
        if each is not None:
            each(start, xc, caps)
        kept.append([caps[u] for u in layout.captured])
        del caps
    if len(kept) == 1:
        held = tuple(kept[0])
    else:
        held = tuple(
            UnitCapture(
                None if parts[0].inputs is None else torch.cat([p.inputs for p in parts]),
                torch.cat([p.cotangents for p in parts]),
            )
            for parts in zip(*kept)
        )
    return Operands(x.num, gradients, held)


def operands_of(ntk: EmpiricalNTK, caps: list[UnitCapture], layout: OperandLayout) -> Operands:
    """The operands of examples whose captures ``caps`` are held (gradients formed a few examples at a time)."""
    num = caps[0].num
    gradients = _held(ntk, num, layout)
    units = ntk.plan().units
    per_example = max(1, sum(ntk.num_outputs * ntk.network.numels[t] for unit in units for t in unit.tensors))
    step = max(1, ntk.budget // (8 * per_example * ntk.network.dtype.itemsize))
    for start in range(0, num, step):
        _fill(ntk, layout, gradients, start, [c[start : start + step] for c in caps])
    return Operands(num, gradients, tuple(caps[u] for u in layout.captured))


def operand_gram(
    ntk: EmpiricalNTK,
    layout: OperandLayout,
    a: Operands,
    b: Operands | None,
    out: Tensor,
    weights: Tensor | None,
    workspace: Workspace,
) -> None:
    """Add the structured Gram of the operands ``a`` and ``b`` (``None``: ``b = a``, using symmetry) to ``out``
    (``(G, n_a C, n_b C)`` per group, or ``(n_a C, n_b C)`` weighted with ``weights`` ``(G,)``)."""
    from ntkgp.ntk.gram import structured_gram  # gram imports this module

    C, symmetric = ntk.num_outputs, b is None
    other = a if b is None else b
    if layout.captured:
        units = [ntk.plan().units[u] for u in layout.captured]
        caps1 = list(a.captures)
        caps2 = caps1 if symmetric else list(other.captures)
        structured_gram(ntk, caps1, caps2, out, weights=weights, budget=ntk.budget // 4, units=units)
    for g, width in enumerate(layout.widths):
        if not width:
            continue
        # symmetric: the lower block triangle of the tile's own product, mirrored
        rows = block_rows(a.num, C, width) if symmetric else a.num
        left, right = a.gradients[g], other.gradients[g]
        for s1 in range(0, a.num, rows):
            e1 = min(s1 + rows, a.num)
            for s2 in range(0, other.num, rows if symmetric else other.num):
                if symmetric and s2 > s1:
                    break
                e2 = min(s2 + (rows if symmetric else other.num), other.num)
                r1, r2 = slice(s1 * C, e1 * C), slice(s2 * C, e2 * C)
                block = gram_product(left[r1], right[r2], workspace)
                add_block(out, weights, g, r1, r2, block, workspace)
                if symmetric and s2 != s1:
                    add_block(out, weights, g, r2, r1, block.T, workspace)


def tile_rows(ntk: EmpiricalNTK, layout: OperandLayout) -> tuple[int, int]:
    """Examples per held tile (operands within half the budget) and per streamed chunk (an eighth)."""
    item = ntk.network.dtype.itemsize
    per_example = layout.entries * item
    tile = max(1, ntk.budget // (2 * per_example))
    stream = max(1, ntk.budget // (8 * per_example))
    return tile, stream


def _tiles(ntk: EmpiricalNTK, x: Inputs, rows: int, desc: str) -> Iterator[tuple[int, Inputs]]:
    yield from ntk.network.chunks(x, rows, desc=desc)


def tiled_gram(ntk: EmpiricalNTK, x1: Inputs, x2: Inputs | None, out: Tensor, weights: Tensor | None) -> None:
    r"""Add the structured units' Gram between ``x1`` and ``x2`` (``None``: ``x1``, symmetric) to ``out``,
    from tiles of held operands (see the module docstring).

    Symmetric: tiles of :math:`R` rows of ``x1`` are captured once each; the rows after a tile are
    streamed past it, and the tile's block and the blocks right of it are mirrored below the diagonal.
    Between two inputs the side with fewer captures in all is held in tiles and the other streamed.
    """
    C, symmetric = ntk.num_outputs, x2 is None
    n2 = x1.num if x2 is None else x2.num
    layout = operand_layout(ntk, x1.num, n2, symmetric)
    tile, stream = tile_rows(ntk, layout)
    workspace = Workspace()
    if x2 is None:
        for s1, xa in _tiles(ntk, x1, tile, "Gram tiles"):
            a = operands(ntk, xa, layout)
            rows1 = slice(s1 * C, (s1 + xa.num) * C)
            block = out[..., rows1, rows1]
            operand_gram(ntk, layout, a, None, block, weights, workspace)
            rest = x1[s1 + xa.num :]
            for s2, xb in rest.chunks(stream):
                b = operands(ntk, xb, layout)
                start = s1 + xa.num + s2
                rows2 = slice(start * C, (start + xb.num) * C)
                part = torch.zeros(*out.shape[:-2], xa.num * C, xb.num * C, dtype=out.dtype, device=out.device)
                operand_gram(ntk, layout, a, b, part, weights, workspace)
                out[..., rows1, rows2] += part
                out[..., rows2, rows1] += part.mT
            del a
        return
    # hold the side whose tiles cost fewer captures of the other: n_held + ceil(n_held / R) * n_streamed
    hold_first = x1.num + math.ceil(x1.num / tile) * x2.num <= x2.num + math.ceil(x2.num / tile) * x1.num
    held, streamed = (x1, x2) if hold_first else (x2, x1)
    for s1, xa in _tiles(ntk, held, tile, "Gram tiles"):
        a = operands(ntk, xa, layout)
        rows1 = slice(s1 * C, (s1 + xa.num) * C)
        for s2, xb in streamed.chunks(stream):
            b = operands(ntk, xb, layout)
            rows2 = slice(s2 * C, (s2 + xb.num) * C)
            if hold_first:
                operand_gram(ntk, layout, a, b, out[..., rows1, rows2], weights, workspace)
            else:
                part = torch.zeros(*out.shape[:-2], xa.num * C, xb.num * C, dtype=out.dtype, device=out.device)
                operand_gram(ntk, layout, a, b, part, weights, workspace)
                out[..., rows2, rows1] += part.mT
        del a


def streamed_cross(
    ntk: EmpiricalNTK,
    x: Inputs,
    held: Operands,
    layout: OperandLayout,
    out: Tensor,
    weights: Tensor | None,
    desc: str = "",
) -> None:
    """Add the structured Gram between ``x`` and the examples of the operands ``held`` (of ``layout``)
    to ``out`` (``(G, n_x C, n C)`` or weighted ``(n_x C, n C)``): ``x`` is streamed past them in chunks,
    each example of ``x`` captured once."""
    C = ntk.num_outputs
    _, stream = tile_rows(ntk, layout)
    workspace = Workspace()
    for start, xa in ntk.network.chunks(x, stream, desc=desc):
        a = operands(ntk, xa, layout)
        operand_gram(ntk, layout, a, held, out[..., start * C : (start + xa.num) * C, :], weights, workspace)
