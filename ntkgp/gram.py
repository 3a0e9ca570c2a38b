r"""Chunked contractions of network Jacobians: per-group NTK Grams, their diagonals, and
:math:`J^\top J`.

These are the dense building blocks of the exact solvers. They hold at most two blocks of
Jacobians, each at most ``budget / 2`` bytes, and never an ``N x P`` Jacobian of all data
unless it fits in that budget.

Row layout is point-major ("interleaved"): row ``n * C + c`` is output ``c`` of point ``n``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.functional import FunctionalNetwork
from ntkgp.parameter_groups import ParameterGroups

__all__ = ["ntk_gram", "ntk_gram_diagonal", "jacobian_outer_products"]


def _block_rows(network: FunctionalNetwork, budget: int) -> int:
    return max(1, budget // (2 * network.jacobian_bytes_per_example()))


def _accumulate_groups(
    out: Tensor, groups: ParameterGroups, network: FunctionalNetwork, left: Tensor, right: Tensor
) -> None:
    # shape: out (G, m1, m2), left (m1, P), right (m2, P)
    for g, start, stop in groups.column_ranges(network.offsets):
        out[g] += (left[:, start:stop] @ right[:, start:stop].T).to(out.dtype)


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
        Bytes for Jacobian blocks (two are held at once).

    Returns
    -------
    Tensor
        Shape ``(G, N1 * C, N2 * C)``, in ``dtype``.
    """
    symmetric = x2 is None
    x2 = x1 if x2 is None else x2
    C = network.num_outputs
    n1, n2 = x1.shape[0], x2.shape[0]
    out = torch.zeros(groups.num_groups, n1 * C, n2 * C, dtype=dtype, device=network.device)
    rows = _block_rows(network, budget)
    for s1, jac1 in network.iter_jacobians(x1, rows, desc="NTK Gram"):
        left = jac1.reshape(-1, network.num_parameters)
        r1 = slice(s1 * C, s1 * C + left.shape[0])
        if symmetric and rows >= n1:
            _accumulate_groups(out[:, r1, r1], groups, network, left, left)
            continue
        for s2 in range(0, n2, rows):
            if symmetric and s2 > s1:
                break
            if symmetric and s2 == s1:
                right = left
            else:
                right = network.jacobian_block(x2[s2 : s2 + rows]).reshape(-1, network.num_parameters)
            r2 = slice(s2 * C, s2 * C + right.shape[0])
            _accumulate_groups(out[:, r1, r2], groups, network, left, right)
            if symmetric and s2 != s1:
                out[:, r2, r1] = out[:, r1, r2].transpose(-1, -2)
    return out


def ntk_gram_diagonal(
    network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, *, budget: int
) -> Tensor:
    r"""Per-group diagonals :math:`\|J_g(x_n)_c\|^2`, shape ``(G, N * C)``, float64."""
    C = network.num_outputs
    out = torch.zeros(groups.num_groups, x.shape[0] * C, dtype=torch.float64, device=network.device)
    for start, jac in network.iter_jacobians(x, _block_rows(network, budget), desc="NTK diagonal"):
        rows = jac.reshape(-1, network.num_parameters)
        sl = slice(start * C, start * C + rows.shape[0])
        for g, a, b in groups.column_ranges(network.offsets):
            out[g, sl] += rows[:, a:b].to(torch.float64).square().sum(-1)
    return out


def jacobian_outer_products(
    network: FunctionalNetwork, x: Tensor, *, per_output: bool, budget: int
) -> Tensor:
    r""":math:`J^\top J` accumulated over data in float64.

    Returns shape ``(C, P, P)`` with :math:`J_c^\top J_c` per output ``c`` if ``per_output``,
    else ``(1, P, P)`` with :math:`\sum_c J_c^\top J_c`.
    """
    P, C = network.num_parameters, network.num_outputs
    out = torch.zeros(C if per_output else 1, P, P, dtype=torch.float64, device=network.device)
    for _, jac in network.iter_jacobians(x, _block_rows(network, budget), desc="J^T J"):
        jac = jac.to(torch.float64)  # shape: (n, C, P)
        if per_output:
            out += torch.einsum("ncp,ncq->cpq", jac, jac)
        else:
            flat = jac.reshape(-1, P)
            out[0] += flat.T @ flat
    return out
