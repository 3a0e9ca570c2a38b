r"""The generic route: per-example Jacobians of the tensors no structured route covers, contracted in blocks.

For the tensors of ``tensors`` (positions in :math:`\theta`), chunks of per-example Jacobians
``(n, C, P_t)`` come from ``vmap(jacrev)`` (:meth:`~ntkgp.network.FunctionalNetwork.jacobian`) and are
contracted group by group. At most two Jacobian blocks of ``budget / 2`` bytes are held at once.
Products run in the network's dtype and are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk.engine import EmpiricalNTK

__all__ = ["generic_diagonal", "generic_gram", "generic_jacobian", "generic_rows"]


def generic_jacobian(ntk: EmpiricalNTK, x: Inputs, tensors: Sequence[int]) -> Tensor:
    """Per-example Jacobian columns of ``tensors`` for all of ``x``, chunk by chunk: ``(n, C, P_t)``."""
    network = ntk.network
    inner = network.chunk_size()
    if x.num <= inner:
        return network.jacobian(x, tensors)
    return torch.cat([network.jacobian(xc, tensors) for _, xc in x.chunks(inner)], 0)


def generic_rows(ntk: EmpiricalNTK, tensors: Sequence[int]) -> int:
    """Examples per Jacobian block so that two blocks fit in the budget."""
    width = ntk.layout.width(tensors)
    return max(1, ntk.budget // (2 * ntk.num_outputs * width * ntk.network.dtype.itemsize))


def generic_gram(
    ntk: EmpiricalNTK,
    x1: Inputs,
    x2: Inputs | None,
    out: Tensor,
    tensors: Sequence[int],
    weights: Tensor | None = None,
) -> None:
    r"""Add :math:`J_g(X_1) J_g(X_2)^\top` of ``tensors`` to ``out`` ``(G, N1 C, N2 C)``, or
    :math:`\sum_g w_g J_g J_g^\top` to ``out`` ``(N1 C, N2 C)`` with ``weights``; ``x2=None`` uses symmetry."""
    symmetric = x2 is None
    x2 = x1 if x2 is None else x2
    C, layout = ntk.num_outputs, ntk.layout
    width = layout.width(tensors)
    ranges = layout.column_ranges(tensors)
    rows = generic_rows(ntk, tensors)
    scale = None
    if weights is not None:  # per-column prior variances of the subset, (P_t,)
        scale = torch.cat([weights[g].expand(stop - start) for g, start, stop in ranges]).to(ntk.network.dtype)

    def accumulate(r1: slice, r2: slice, left: Tensor, right: Tensor) -> None:
        if scale is not None:
            out[r1, r2] += ((left * scale) @ right.T).to(out.dtype)
            return
        for g, start, stop in ranges:
            out[g, r1, r2] += (left[:, start:stop] @ right[:, start:stop].T).to(out.dtype)

    for s1, xb in ntk.network.chunks(x1, rows, desc="NTK Gram"):
        left = generic_jacobian(ntk, xb, tensors).reshape(-1, width)
        r1 = slice(s1 * C, s1 * C + left.shape[0])
        for s2 in range(0, x2.num, rows):
            if symmetric and s2 > s1:
                break
            same = symmetric and s2 == s1
            right = left if same else generic_jacobian(ntk, x2[s2 : s2 + rows], tensors).reshape(-1, width)
            r2 = slice(s2 * C, s2 * C + right.shape[0])
            accumulate(r1, r2, left, right)
            if symmetric and not same:
                out[..., r2, r1] = out[..., r1, r2].transpose(-1, -2)


def generic_diagonal(ntk: EmpiricalNTK, x: Inputs, out: Tensor, tensors: Sequence[int]) -> None:
    r"""Add the per-group :math:`\|J_g(x_n)_c\|^2` of ``tensors`` to ``out`` ``(G, N C)``."""
    width = ntk.layout.width(tensors)
    ranges = ntk.layout.column_ranges(tensors)
    for start, xb in ntk.network.chunks(x, generic_rows(ntk, tensors), desc="NTK diagonal"):
        jac = generic_jacobian(ntk, xb, tensors).reshape(-1, width)
        sl = slice(start * ntk.num_outputs, start * ntk.num_outputs + jac.shape[0])
        for g, a, b in ranges:
            out[g, sl] += jac[:, a:b].to(torch.float64).square().sum(-1)
