r"""Kernel-matrix products :math:`K(X_1, X_2)\,V` from per-layer factors, for all-``nn.Linear`` networks.

For a dense layer with inputs :math:`a_n` and output cotangents :math:`g_{n,c}` (the factors of
:meth:`~ntkgp.functional.FunctionalNetwork.structured_factors`), the weight's Jacobian is
:math:`\partial f_c(x_n)/\partial W = g_{n,c} a_n^\top`. One column :math:`v` of
:math:`V` ``(N_2 C)`` is pulled back and pushed forward in factor form:

.. math::
    U = \sum_{m,d} v_{m,d}\, g_{m,d}\, a_m^\top = H^\top A_2,\qquad H_m = \sum_d v_{m,d}\, g_{m,d},

    (K_W v)_{n,c} = g_{n,c}^\top U a_n,\qquad (K_b v)_{n,c} = g_{n,c}^\top \textstyle\sum_m H_m .

Per layer and column that is :math:`2 (N_1 + N_2)\, d_{in} d_{out}` flops for the two products plus
:math:`2 (N_1 + N_2) C d_{out}` for the cotangent contractions, and no per-example Jacobian:
:math:`C` times fewer flops than contracting Jacobians ``(N, C, P)`` with the columns, and no
``C`` backward passes per example to build them. The factors come from one forward and ``C``
backward passes per data chunk, so memory is bounded by the caller's budget; for inputs whose
factors fit in half of it they are computed once and reused
(:meth:`~ntkgp.functional.FunctionalNetwork.cached_structured_factors`).

Used by :class:`~ntkgp.operators.NTKLinearOperator` and the Lanczos / CG solvers when every trainable
tensor sits in a structured ``nn.Linear`` layer (and :func:`supports_factor_matmul` says it pays); otherwise they
use the generic jvp / vjp route.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ntkgp.functional import FunctionalNetwork
from ntkgp.parameter_groups import ParameterGroups

__all__ = ["factor_kernel_matmul", "supports_factor_matmul"]

#: ``(t, n, d_out)`` intermediates alive at once in a chunk (the output contraction, the layer
#: tangent and its sum); the chunk is sized so that these fit in the caller's budget
_LIVE_INTERMEDIATES = 3
#: with one network output, the factor form is used up to this many columns
_SINGLE_OUTPUT_MAX_VECTORS = 96


def supports_factor_matmul(network: FunctionalNetwork, vectors: int) -> bool:
    """Whether to multiply ``vectors`` columns by the factor form.

    Needs every trainable tensor in a structured ``nn.Linear`` layer. Then the factor form does
    ``C`` times fewer flops than the Jacobian GEMM (jvp / vjp through per-chunk Jacobians), but it
    moves ``(t, n, d_out)`` intermediates through memory; with one output the GEMM wins from about
    a hundred columns on. Measured (8-256-256-C MLP, N = 2000, 2 cores, factors cached): C = 1,
    33 columns 0.48 s against 1.02 s, 64 columns 0.90 s against 1.27 s, 128 columns 2.1 s
    against 1.4 s; C = 10 (factors recomputed), 64 columns 1.6 s against 18 s, 512 columns 10.4 s
    against 38 s.
    """
    layers = network.structured_layers
    if not layers or network.generic_tensors or any(layer.kind != "linear" for layer in layers):
        return False
    return network.num_outputs > 1 or vectors <= _SINGLE_OUTPUT_MAX_VECTORS


def _rows(network: FunctionalNetwork, vectors: int, budget: int) -> int:
    """Examples per chunk: at most the factor chunk, with the ``(t, n, width)`` intermediates within ``budget``."""
    modules = dict(network.module.named_modules())
    width = max(max(modules[layer.name].in_features, modules[layer.name].out_features)
                for layer in network.structured_layers)
    per_row = _LIVE_INTERMEDIATES * vectors * width * network.dtype.itemsize
    return max(1, min(network.factor_chunk_size(), budget // max(1, per_row)))


def _contract_outputs(v: Tensor, g: Tensor) -> Tensor:
    """``sum_c v[t, n, c] g[n, c, :]``: ``(t, n, C)``, ``(n, C, d)`` -> ``(t, n, d)``."""
    if g.shape[1] == 1:  # a broadcast product; einsum would run n tiny batched GEMMs
        return v[:, :, :1] * g[None, :, 0, :]
    return torch.einsum("tnc,ncd->tnd", v, g)


def _expand_outputs(y: Tensor, g: Tensor) -> Tensor:
    """``y[t, n, :] . g[n, c, :]`` for every output: ``(t, n, d)``, ``(n, C, d)`` -> ``(t, n, C)``."""
    if g.shape[1] == 1:  # as in _contract_outputs
        return (y * g[None, :, 0, :]).sum(-1, keepdim=True)
    return torch.einsum("tnd,ncd->tnc", y, g)


def _factor_chunks(
    network: FunctionalNetwork, x: Tensor, rows: int, budget: int, desc: str
) -> Iterator[tuple[int, Tensor, list[tuple[Tensor, Tensor]]]]:
    """``(start, chunk, its factors)`` over ``x``: slices of the cached whole-data factors when
    they fit in half the budget, else a factor pass per chunk."""
    whole = network.cached_structured_factors(x, budget // 2)
    for start, xc in network.chunks(x, rows, desc=desc):
        stop = start + xc.shape[0]
        yield start, xc, (network.structured_factors(xc) if whole is None
                          else [(a[start:stop], g[start:stop]) for a, g in whole])


def factor_kernel_matmul(
    network: FunctionalNetwork, groups: ParameterGroups, x1: Tensor, x2: Tensor, weights: Tensor, columns: Tensor,
    budget: int,
) -> Tensor:
    r""":math:`\sum_g w_g K_g(X_1, X_2)\, V` by the factor form (module docstring).

    Parameters
    ----------
    x1, x2:
        Inputs ``(N1, D)`` and ``(N2, D)``.
    weights:
        Per-group weights ``(G,)``, e.g. :math:`1/\delta_g`.
    columns:
        ``(t, N2, C)``: ``t`` vectors over the rows of :math:`X_2`.
    budget:
        Bytes: the whole-data factors are cached when they fit in half of it, and the chunks'
        ``(t, n, d)`` intermediates are sized to fit in it.

    Returns
    -------
    Tensor
        ``(t, N1, C)`` in the network's dtype.
    """
    t = columns.shape[0]
    dtype = network.dtype
    columns = columns.to(dtype)
    w = weights.detach().to(dtype)
    layers = network.structured_layers
    rows = _rows(network, t, budget)
    # pull back: per layer U = H^T A2 (t, d_out, d_in) and the bias sum of H (t, d_out), over chunks of X2
    pulled: list[tuple[Tensor | None, Tensor | None]] = [(None, None)] * len(layers)
    for start, xc, factors in _factor_chunks(network, x2, rows, budget, "factor matvec (pull back)"):
        v = columns[:, start : start + xc.shape[0]]  # shape: (t, n, C)
        for i, (layer, (a, g)) in enumerate(zip(layers, factors)):
            h = _contract_outputs(v, g)  # shape: (t, n, d_out)
            u, b = pulled[i]
            if layer.weight is not None:
                part = torch.einsum("tnd,ne->tde", h, a)  # shape: (t, d_out, d_in)
                u = part if u is None else u + part
            if layer.bias is not None:
                part = h.sum(1)  # shape: (t, d_out)
                b = part if b is None else b + part
            pulled[i] = (u, b)
    # push forward over chunks of X1
    outs = []
    for _, xc, factors in _factor_chunks(network, x1, rows, budget, "factor matvec (push forward)"):
        out = torch.zeros(t, xc.shape[0], network.num_outputs, dtype=dtype, device=network.device)
        for layer, (a, g), (u, b) in zip(layers, factors, pulled):
            y = None  # shape: (t, n, d_out), the layer-output tangent
            if u is not None:
                assert layer.weight is not None
                y = w[groups.tensor_group[layer.weight]] * torch.einsum("tde,ne->tnd", u, a)
            if b is not None:
                assert layer.bias is not None
                yb = (w[groups.tensor_group[layer.bias]] * b)[:, None, :]
                y = yb if y is None else y + yb
            if y is not None:
                out += _expand_outputs(y, g)
        outs.append(out)
    return torch.cat(outs, dim=1)
