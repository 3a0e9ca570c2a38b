r"""Scratch buffers and blocking shared by the structured Gram routines.

Grams are built in row blocks of points. A symmetric Gram (``x1 = x2``) is built from its lower
block triangle, about :data:`SYMMETRIC_BLOCKS` row blocks (4 blocks: 62.5% of the GEMM work), the
mirror blocks being copies. Blocks keep at least :data:`MIN_BLOCK_ROWS` GEMM rows (points times
outputs): large products, and few operations in all (each costs a thread synchronization); products
with an inner dimension of :data:`LONG_DEPTH` or more (per-example weight gradients of a convolution)
keep :data:`MIN_LONG_BLOCK_ROWS`, so that their symmetric Grams use the triangle from 26 points on
(C = 10) rather than 103.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FLOAT32_PANEL",
    "LONG_DEPTH",
    "MIN_LONG_BLOCK_ROWS",
    "SYMMETRIC_BLOCKS",
    "Workspace",
    "accumulate",
    "add_block",
    "block_rows",
    "gram_product",
    "pair_blocks",
]

#: row blocks of a symmetric structured Gram
SYMMETRIC_BLOCKS = 4
#: GEMM rows a block keeps at least
MIN_BLOCK_ROWS = 1024
#: GEMM rows a block keeps at least when its products have an inner dimension of ``LONG_DEPTH`` or more
MIN_LONG_BLOCK_ROWS = 256
LONG_DEPTH = 4096
#: columns contracted per float32 product by :func:`gram_product` before the float64 sum
FLOAT32_PANEL = 4096
#: entries converted at a time by :func:`accumulate` (16 MiB of float64)
_CONVERT_ELEMENTS = 2**21


class Workspace:
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


def accumulate(target: Tensor, source: Tensor, workspace: Workspace) -> None:
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


def add_block(
    out: Tensor, weights: Tensor | None, group: int, rows: slice, cols: slice, block: Tensor, workspace: Workspace
) -> None:
    """``out[group, rows, cols] += block``, or ``out[rows, cols] += weights[group] * block`` (float64 accumulation)."""
    if weights is None:
        accumulate(out[group, rows, cols], block, workspace)
    else:
        out[rows, cols].addcmul_(block.to(out.dtype), weights[group].to(out.dtype))


def block_rows(n: int, outputs: int, depth: int = 0) -> int:
    """Points per row block of a structured Gram of ``n`` rows of points whose products have inner
    dimension ``depth``: blocks keep :data:`MIN_BLOCK_ROWS` GEMM rows, or :data:`MIN_LONG_BLOCK_ROWS`
    when ``depth`` is at least :data:`LONG_DEPTH` (long products are efficient at fewer rows, and a
    symmetric Gram then computes its lower block triangle from fewer points on)."""
    least = MIN_LONG_BLOCK_ROWS if depth >= LONG_DEPTH else MIN_BLOCK_ROWS
    return max(1, -(-least // outputs), -(-n // SYMMETRIC_BLOCKS))


def pair_blocks(n1: int, n2: int, rows: int, symmetric: bool) -> list[tuple[int, int, int, int]]:
    """Blocks ``(s1, e1, s2, e2)`` of ``rows`` points covering ``(n1, n2)``; symmetric: only ``s2 <= s1``."""
    return [
        (s1, min(s1 + rows, n1), s2, min(s2 + rows, n2))
        for s1 in range(0, n1, rows)
        for s2 in range(0, n2, rows)
        if not (symmetric and s2 > s1)
    ]


def gram_product(left: Tensor, right: Tensor, workspace: Workspace) -> Tensor:
    r"""``left @ right.T`` in float64: one product for float64 operands; float32 operands in panels of
    :data:`FLOAT32_PANEL` columns, each panel's float32 product summed in float64.

    For float32, an entry :math:`k = \sum_p a_p^\top b_p` over panels :math:`p` then has error at most
    :math:`\gamma_K\sum_p\lVert a_p\rVert\lVert b_p\rVert \le \gamma_K\lVert a\rVert\lVert b\rVert`,
    :math:`\gamma_K \approx K\,2^{-24}` with :math:`K = 4096` (the bound of a float32 dot product of
    length :math:`K`, and Cauchy-Schwarz over the panels): :math:`2.4\times10^{-4}\lVert a\rVert\lVert b\rVert`
    at worst, about :math:`\sqrt{K}\,2^{-24} = 3.8\times10^{-6}` of it typically. For a Gram,
    :math:`\lVert a\rVert\lVert b\rVert = \sqrt{k_{aa}k_{bb}}`.
    """
    if left.dtype == torch.float64:
        return left @ right.T
    width = left.shape[1]
    total = torch.zeros(left.shape[0], right.shape[0], dtype=torch.float64, device=left.device)
    for start in range(0, width, FLOAT32_PANEL):
        stop = min(start + FLOAT32_PANEL, width)
        accumulate(total, workspace.matmul("panel", left[:, start:stop], right[:, start:stop].T), workspace)
    return total
