r"""Chunked contractions of network Jacobians: per-group NTK Grams, their diagonals, and
:math:`J^\top J`.

Two routes, combined in one kernel (issue "fast exact NTK"):

* **Structured** (``nn.Linear`` layers, see :attr:`FunctionalNetwork.linear_layers`). With layer
  inputs :math:`A` ``(N, d_in)`` and output cotangents :math:`G_c` ``(N, d_out)``,

  .. math::
      K_W[(n,c),(m,d)] = (a_n\cdot a_m)\,(g_{n,c}\cdot g_{m,d}),\qquad
      K_b[(n,c),(m,d)] = g_{n,c}\cdot g_{m,d},

  costing :math:`N^2 C^2 (d_{in} + d_{out})` instead of :math:`N^2 C^2 d_{in} d_{out}`;
  per-example gradients are never formed.
* **Generic**: every other parameter tensor, by contracting chunked per-example Jacobians of
  just those tensors. At most two Jacobian blocks of ``budget / 2`` bytes are held at once.

Both agree to floating-point round-off (tested). Products run in the network's dtype and are
accumulated in float64. Row layout is point-major: row ``n * C + c`` is output ``c`` of point ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ntkgp.functional import FunctionalNetwork
from ntkgp.parameter_groups import ParameterGroups

__all__ = ["jacobian_outer_products", "ntk_gram", "ntk_gram_diagonal", "structured_gram", "subset_ranges"]

Factors = list[tuple[Tensor, Tensor]]


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
    r"""Add the ``nn.Linear`` layers' NTK contributions to ``out``.

    ``out`` is ``(G, N1*C, N2*C)`` (per group), or ``(N1*C, N2*C)`` with ``weights`` ``(G,)``
    giving :math:`\sum_g w_g K_g` directly.
    """
    C = network.num_outputs
    for layer, (a1, g1), (a2, g2) in zip(network.linear_layers, factors1, factors2):
        # shape: g1 (n1, C, d_out) -> (n1*C, d_out); gg (n1*C, n2*C)
        gg = (g1.reshape(-1, g1.shape[-1]) @ g2.reshape(-1, g2.shape[-1]).T).to(out.dtype)
        for tensor, term in ((layer.bias, None), (layer.weight, a1 @ a2.T)):
            if tensor is None:
                continue
            block = gg if term is None else gg * term.to(out.dtype).repeat_interleave(C, 0).repeat_interleave(C, 1)
            g = groups.tensor_group[tensor]
            if weights is None:
                out[g] += block
            else:
                out += weights[g].to(out.dtype) * block


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
        Bytes for Jacobian blocks of the generic route (two are held at once).

    Returns
    -------
    Tensor
        Shape ``(G, N1 * C, N2 * C)``, in ``dtype``.
    """
    C = network.num_outputs
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    out = torch.zeros(groups.num_groups, x1.shape[0] * C, n2 * C, dtype=dtype, device=network.device)
    if network.linear_layers:
        f1 = network.linear_layer_factors(x1)
        f2 = f1 if x2 is None else network.linear_layer_factors(x2)
        structured_gram(network, groups, f1, f2, out)
    if network.generic_tensors:
        _generic_gram(network, groups, x1, x2, out, budget, network.generic_tensors)
    return out


def ntk_gram_diagonal(
    network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, *, budget: int
) -> Tensor:
    r"""Per-group diagonals :math:`\|J_g(x_n)_c\|^2`, shape ``(G, N * C)``, float64."""
    C = network.num_outputs
    out = torch.zeros(groups.num_groups, x.shape[0] * C, dtype=torch.float64, device=network.device)
    if network.linear_layers:
        for layer, (a, g) in zip(network.linear_layers, network.linear_layer_factors(x)):
            g_sq = g.to(torch.float64).square().sum(-1).reshape(-1)  # shape: (N*C,)
            if layer.bias is not None:
                out[groups.tensor_group[layer.bias]] += g_sq
            if layer.weight is not None:
                a_sq = a.to(torch.float64).square().sum(-1).repeat_interleave(C)
                out[groups.tensor_group[layer.weight]] += a_sq * g_sq
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
