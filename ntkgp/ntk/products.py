r"""Products with the Jacobian and the NTK: :math:`Jv`, :math:`P_0^{-1}J^\top u`, :math:`KV`, :math:`J^\top\Lambda J`.

* :func:`pushforward` :math:`J(X) V` and :func:`pullback` :math:`S\,J(X)^\top U` (``S`` an optional
  per-group scaling, :math:`P_0^{-1}` with ``scale = 1/delta``): batched jvps / vjps, or, for many
  vectors (more than ``4 C``), a GEMM with per-chunk Jacobians, which was up to 50x faster on an
  8-256-256-1 MLP (512 vectors, 1000 examples: 4 s against 200 s). A plain MLP pushes forward
  and pulls back through its closed-form captures (:mod:`ntkgp.structured.chain`) instead of jvps
  and vjps (the captures of the training data are cached when they fit: no pass over it).
* :func:`kernel_matmul` :math:`\sum_g w_g K_g(X_1, X_2) V`: one pullback and one pushforward, or,
  when every tensor is on a one-position structured unit (``nn.Linear`` networks), the factor form
  of :mod:`ntkgp.structured.products` with no Jacobian and no jvp/vjp at all.
* :func:`jacobian` per-example :math:`J(x)` of a chunk, structured columns from captures and the
  rest by ``vmap(jacrev)``; :func:`jacobian_outer` :math:`J^\top J` or :math:`J^\top \Lambda J`
  accumulated over data in float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ntkgp.linalg.symmetric_gram import add_lower_gram, mirror_lower
from ntkgp.network.inputs import Inputs
from ntkgp.ntk.captures import (
    capture_bytes,
    capture_chunks,
    capture_rows,
    captures,
    captures_with_outputs,
    held_captures,
)
from ntkgp.ntk.engine import EmpiricalNTK
from ntkgp.structured.capture import UnitCapture, differentiable
from ntkgp.structured.outer import kronecker_outer
from ntkgp.structured.products import unit_columns, unit_pullback, unit_pushforward, write_columns

__all__ = [
    "jacobian",
    "jacobian_outer",
    "kernel_matmul",
    "kernel_matmul_columns",
    "outputs",
    "outputs_and_pushforward",
    "pullback",
    "pushforward",
    "uses_factor_form",
    "uses_kronecker_outer",
]

#: ``(t, n, L d_out)`` intermediates alive at once in a factor-form chunk
_LIVE_INTERMEDIATES = 3
#: with one network output, the factor form is used up to this many columns
_SINGLE_OUTPUT_MAX_VECTORS = 96


def _through_jacobian(ntk: EmpiricalNTK, vectors: int) -> bool:
    return vectors > 4 * ntk.num_outputs


def pushforward(ntk: EmpiricalNTK, x: Inputs, tangents: Tensor) -> Tensor:
    r""":math:`J(x)\,v_t` for ``T`` tangents: ``(T, P)`` -> ``(T, N, C)`` in the network's dtype."""
    network = ntk.network
    if not _through_jacobian(ntk, tangents.shape[0]):
        if ntk.dense_chain is not None:
            return _pushforward_by_captures(ntk, x, tangents)
        return network.jvp(x, tangents)
    flat = tangents.to(network.dtype)
    parts = [
        torch.einsum("ncp,tp->tnc", jacobian(ntk, xc), flat)
        for _, xc in network.chunks(x, network.chunk_size(), desc="jvp")
    ]
    return torch.cat(parts, dim=1)


def _captures_serve(ntk: EmpiricalNTK, x: Inputs) -> bool:
    """Whether a capture pass over ``x`` should stand in for its forward pass, its captures kept for the products
    with ``x`` that follow: ``x`` needs no graph and has no captures held yet, and its captures fit in half the
    budget with no unit that the Grams hold as per-example gradients (:func:`~ntkgp.ntk.tiles.operand_layout`:
    a last layer, an MLP, linear maps), so the Grams use them as they are."""
    from ntkgp.ntk.tiles import operand_layout  # tiles imports the capture helpers this module does

    if differentiable(x) or not ntk.plan(x).units or held_captures(ntk, x) is not None:
        return False
    layout = operand_layout(ntk, x.num, x.num, True)  # what the captures hold once the pass is done
    return not any(layout.widths) and x.num * layout.entries * ntk.network.dtype.itemsize <= ntk.budget // 2


def outputs(ntk: EmpiricalNTK, x: Inputs) -> Tensor:
    r""":math:`f(x;\hat\theta)` ``(N, C)`` in the network's dtype.

    From a capture pass whose captures are kept (:func:`_captures_serve`: a last layer, an MLP) for the
    products with ``x`` that follow (a Gram, :math:`J^\top\Lambda J`, a covariance), so that the network does
    not run over ``x`` twice; otherwise a forward pass.
    """
    if not _captures_serve(ntk, x):
        return ntk.network.forward(x)
    caps, out = captures_with_outputs(ntk, x)
    ntk.captures.put(x, caps)
    return out


def outputs_and_pushforward(ntk: EmpiricalNTK, x: Inputs, tangents: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`f(x;\hat\theta)` ``(N, C)`` and :func:`pushforward` :math:`J(x)\,v_t` ``(T, N, C)``, network dtype.

    When every tensor is on a structured unit, both come from one capture pass, the pushforward in closed form
    from the captures (no jvp), and the captures are kept for the next product with ``x`` (a predictive
    covariance, a Jacobian): always for a plain MLP whose captures fit in half the budget, and for other
    networks when :func:`_captures_serve` (or when ``x``'s captures are held already: then a forward pass and
    the closed form). Otherwise a forward pass and :func:`pushforward`.
    """
    network = ntk.network
    if _through_jacobian(ntk, tangents.shape[0]) or ntk.plan(x).generic:
        return network.forward(x), pushforward(ntk, x, tangents)
    if ntk.dense_chain is not None:
        serve = held_captures(ntk, x) is None and capture_bytes(ntk, x) <= ntk.budget // 2
    else:
        held = held_captures(ntk, x)
        if held is not None:
            return network.forward(x), _captured_pushforward(ntk, x, held, tangents)
        serve = _captures_serve(ntk, x)
    if not serve:
        return network.forward(x), pushforward(ntk, x, tangents)
    caps, out = captures_with_outputs(ntk, x)
    if not differentiable(x):
        ntk.captures.put(x, caps)
    return out, _captured_pushforward(ntk, x, caps, tangents)


def _captured_pushforward(ntk: EmpiricalNTK, x: Inputs, caps: list[UnitCapture], tangents: Tensor) -> Tensor:
    r""":math:`J v = \sum_u g\,(V_W a + v_b)` from the captures of ``x`` (every tensor on a structured unit)."""
    network, plan = ntk.network, ntk.plan(x)
    flat = tangents.to(network.dtype)
    offsets = network.offsets
    total: Tensor | None = None
    for unit, cap in zip(plan.units, caps):
        unit_tangents = {i: flat[:, offsets[i] : offsets[i + 1]] for i in unit.tensors}
        part = unit_pushforward(unit, cap, unit_tangents)  # shape: (T, n, C)
        if part is not None:
            total = part if total is None else total + part
    assert total is not None
    return total


def _pushforward_by_captures(ntk: EmpiricalNTK, x: Inputs, tangents: Tensor) -> Tensor:
    r""":func:`pushforward` of a plain MLP (closed-form captures, :mod:`ntkgp.structured.chain`): per unit
    :math:`J_u v = \sum g\,(V_W a + v_b)`, no jvp (whose ``vmap`` and dual tensors cost more on few points)."""
    # the captures of all of x are kept (and reused) when they fit in half the budget, as kernel_matmul's
    parts = [
        _captured_pushforward(ntk, xc, caps, tangents)
        for _, xc, caps in capture_chunks(ntk, x, capture_rows(ntk, x), ntk.budget // 2, "jvp")
    ]
    return torch.cat(parts, dim=1).to(ntk.network.dtype)


def pullback(ntk: EmpiricalNTK, x: Inputs, cotangents: Tensor, *, scale: Tensor | None = None) -> Tensor:
    r""":math:`\sum_n J(x_n)^\top u_{t,n}`, per group scaled by ``scale`` ``(G,)``: ``(T, N, C)`` -> ``(T, P)`` float64.

    With ``scale = 1/delta`` this is :math:`P_0^{-1}J^\top U`, the weight-space image of
    kernel-space coefficients (posterior weights :math:`\bar\theta = P_0^{-1}J^\top\alpha`).
    """
    network = ntk.network
    if _through_jacobian(ntk, cotangents.shape[0]):
        cot = cotangents.to(network.dtype)
        total: Tensor | None = None
        for start, xc in network.chunks(x, network.chunk_size(), desc="vjp"):
            part = torch.einsum("tnc,ncp->tp", cot[:, start : start + xc.num], jacobian(ntk, xc))
            total = part if total is None else total + part
        assert total is not None
        pulled = total.to(torch.float64)
    else:
        # closed form: a plain MLP always, other networks when the captures of x are held (e.g. kept by outputs())
        closed = ntk.dense_chain is not None or held_captures(ntk, x) is not None
        by_captures = _pullback_by_captures(ntk, x, cotangents) if closed else None
        pulled = (network.vjp(x, cotangents) if by_captures is None else by_captures).to(torch.float64)
    return pulled if scale is None else ntk.layout.scale(pulled, scale.to(torch.float64))


def _pullback_by_captures(ntk: EmpiricalNTK, x: Inputs, cotangents: Tensor) -> Tensor | None:
    r""":func:`pullback` by closed-form captures (held, or a plain MLP's): per unit :math:`J_u^\top u` from its
    inputs and cotangents (:func:`~ntkgp.structured.products.unit_pullback`), no vjp; ``None`` when the units do
    not cover every tensor."""
    network, plan = ntk.network, ntk.plan(x)
    offsets = network.offsets
    if sorted(i for unit in plan.units for i in unit.tensors) != list(range(len(offsets) - 1)):
        return None
    cot = cotangents.to(network.dtype)
    total: Tensor | None = None
    for start, xc, caps in capture_chunks(ntk, x, capture_rows(ntk, x), ntk.budget // 2, "vjp"):
        parts: dict[int, Tensor] = {}
        for unit, cap in zip(plan.units, caps):
            parts.update(unit_pullback(unit, cap, cot[:, start : start + xc.num]))
        flat = torch.cat([parts[i] for i in range(len(offsets) - 1)], dim=-1)  # shape: (T, P)
        total = flat if total is None else total + flat
    return total


def uses_factor_form(ntk: EmpiricalNTK, vectors: int, x: Inputs | None = None) -> bool:
    """Whether :func:`kernel_matmul` with ``vectors`` columns runs in factor form.

    Needs every tensor on a one-position structured unit. Then the factor form does ``C`` times
    fewer flops than the Jacobian GEMM, but it moves ``(t, n, d_out)`` intermediates through
    memory; with one output the GEMM wins from about a hundred columns on. Measured (8-256-256-C
    MLP, N = 2000, 2 cores, captures cached): C = 1, 33 columns 0.48 s against 1.02 s, 64 columns
    0.90 s against 1.27 s, 128 columns 2.1 s against 1.4 s; C = 10 (captures recomputed), 64
    columns 1.6 s against 18 s, 512 columns 10.4 s against 38 s.
    """
    plan = ntk.plan(x)
    if not plan.units or plan.generic or not all(unit.is_linear for unit in plan.units):
        return False
    return ntk.num_outputs > 1 or vectors <= _SINGLE_OUTPUT_MAX_VECTORS


def _factor_rows(ntk: EmpiricalNTK, x: Inputs, vectors: int) -> int:
    """Examples per chunk: at most a capture pass, with the ``(t, n, L, width)`` intermediates within the budget."""
    width = max(max(u.taps, u.width) * u.positions for u in ntk.plan(x).units)
    per_row = _LIVE_INTERMEDIATES * vectors * width * ntk.network.dtype.itemsize
    return max(1, min(capture_rows(ntk, x), ntk.budget // max(1, per_row)))


def kernel_matmul(
    ntk: EmpiricalNTK,
    x1: Inputs,
    x2: Inputs,
    weights: Tensor,
    columns: Tensor,
    *,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    r""":math:`\sum_g w_g K_g(X_1, X_2)\, V` for ``t`` vectors ``V`` ``(t, N2, C)``: ``(t, N1, C)``, network dtype.

    ``weights`` ``(G,)`` are per-group, e.g. :math:`1/\delta_g`. Captures of ``X1`` and ``X2`` are
    cached when they fit in half the budget. ``reduce`` sums the pulled-back vectors
    :math:`J(X_2)^\top V` over processes when ``X2`` is one rank's shard (:mod:`ntkgp.distributed`).
    """
    t = columns.shape[0]
    if not uses_factor_form(ntk, t, x2):
        pulled_back = pullback(ntk, x2, columns, scale=weights)
        return pushforward(ntk, x1, pulled_back if reduce is None else reduce(pulled_back))
    dtype, device = ntk.network.dtype, ntk.network.device
    columns = columns.to(dtype)
    w = weights.detach().to(dtype)
    units, group = ntk.plan().units, ntk.layout.tensor_group
    rows = _factor_rows(ntk, x2, t)
    pulled: dict[int, Tensor] = {}  # θ position -> (t, numel), summed over chunks of X2
    for start, xc, caps in capture_chunks(ntk, x2, rows, ntk.budget // 2, "factor matvec (pull back)"):
        v = columns[:, start : start + xc.num]  # shape: (t, n, C)
        for unit, cap in zip(units, caps):
            for i, part in unit_pullback(unit, cap, v).items():
                pulled[i] = part if i not in pulled else pulled[i] + part
    if reduce is not None:  # one all-reduce of every tensor's part, in θ order
        keys = sorted(pulled)
        summed = reduce(torch.cat([pulled[i] for i in keys], 1)).split([pulled[i].shape[1] for i in keys], 1)
        pulled = dict(zip(keys, summed))
    scaled = {i: w[group[i]] * p for i, p in pulled.items()}
    outs = []
    for _, xc, caps in capture_chunks(
        ntk, x1, _factor_rows(ntk, x1, t), ntk.budget // 2, "factor matvec (push forward)"
    ):
        out = torch.zeros(t, xc.num, ntk.num_outputs, dtype=dtype, device=device)
        for unit, cap in zip(units, caps):
            pushed = unit_pushforward(unit, cap, scaled)
            if pushed is not None:
                out += pushed
        outs.append(out)
    return torch.cat(outs, dim=1)


def kernel_matmul_columns(
    ntk: EmpiricalNTK,
    x1: Inputs,
    x2: Inputs,
    weights: Tensor,
    columns: Tensor,
    *,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    r""":func:`kernel_matmul` on columns: ``(N2 C, t)`` -> ``(N1 C, t)``, float64 (rows point-major)."""
    t = columns.shape[1]
    out = kernel_matmul(ntk, x1, x2, weights, columns.T.reshape(t, x2.num, ntk.num_outputs), reduce=reduce)
    return out.reshape(t, -1).T.to(torch.float64)


def jacobian(
    ntk: EmpiricalNTK, x: Inputs, tensors: Sequence[int] | None = None, *, captured: list[UnitCapture] | None = None
) -> Tensor:
    r"""Per-example :math:`J(x)` of one chunk, ``(n, C, P)`` (or the columns of ``tensors``, in that order).

    Structured tensors' columns are formed from the chunk's captures (one forward and ``C``
    backward passes for the chunk, where ``vmap(jacrev)`` costs ``C`` backward passes per example:
    about 10x faster on an 8-256-256-1 MLP; ``captured``: the chunk's captures, when the caller holds
    them); the rest by ``vmap(jacrev)``. Materializes ``n C P`` entries: callers chunk the data.
    """
    network, layout = ntk.network, ntk.layout
    plan = ntk.plan(x)
    requested = list(range(len(network.names))) if tensors is None else list(tensors)
    owner = plan.owner()
    generic = [t for t in requested if t not in owner]
    if len(generic) == len(requested):
        return network.jacobian(x, generic)
    offsets = dict(zip(requested, itertools.accumulate((layout.numels[t] for t in requested), initial=0)))
    held = captured if captured is not None else held_captures(ntk, x)  # e.g. kept by the mean
    caps = captures(ntk, x) if held is None else held
    n, C = x.num, ntk.num_outputs
    if differentiable(x):  # columns as new tensors, concatenated: the graph to x is kept
        columns: dict[int, Tensor] = {}
        if generic:
            jac = network.jacobian(x, generic)
            columns.update(zip(generic, jac.split([layout.numels[t] for t in generic], -1)))
        for unit, cap in zip(plan.units, caps):
            columns.update(unit_columns(unit, cap))
        return torch.cat([columns[t] for t in requested], -1)
    # every block is written into its columns of one output: the Jacobian is held once, not twice
    out = torch.empty(n, C, layout.width(requested), dtype=network.dtype, device=network.device)
    if generic:
        jac = network.jacobian(x, generic)
        start = 0
        for t in generic:
            out[..., offsets[t] : offsets[t] + layout.numels[t]] = jac[..., start : start + layout.numels[t]]
            start += layout.numels[t]
        del jac
    for unit, cap in zip(plan.units, caps):
        targets = {t: out[..., offsets[t] : offsets[t] + layout.numels[t]] for t in unit.tensors if t in offsets}
        if targets:
            write_columns(unit, cap, targets)
    return out


def uses_kronecker_outer(ntk: EmpiricalNTK, x: Inputs | None = None) -> bool:
    """Whether :func:`jacobian_outer` of a Laplace GP takes the Kronecker route of
    :mod:`ntkgp.structured.outer`: every tensor on a one-position dense unit (a last-layer
    subnetwork, an MLP), at most 64 outputs per unit (one GEMM per output row)."""
    plan = ntk.plan(x)
    return bool(plan.units) and not plan.generic and all(u.is_linear and u.width <= 64 for u in plan.units)


def jacobian_outer(ntk: EmpiricalNTK, x: Inputs, *, per_output: bool, hessian_root: Tensor | None = None) -> Tensor:
    r""":math:`J^\top J` accumulated over data in float64.

    Returns ``(C, P, P)`` with :math:`J_c^\top J_c` per output ``c`` if ``per_output``, else
    ``(1, P, P)`` with :math:`\sum_c J_c^\top J_c`. With ``hessian_root`` ``B`` ``(N, C, C)``, each
    example's Jacobian is replaced by :math:`B_n^\top J_n`, giving the GGN
    :math:`J^\top \Lambda J = \sum_n J_n^\top B_n B_n^\top J_n`; when every tensor sits on a narrow
    one-position dense unit (:func:`uses_kronecker_outer`: a last-layer GP) it is formed from the
    captures without per-example Jacobians (:mod:`ntkgp.structured.outer`), ``C`` times fewer flops.
    """
    network = ntk.network
    P, C = network.num_parameters, ntk.num_outputs
    out = torch.zeros(C if per_output else 1, P, P, dtype=torch.float64, device=network.device)
    plan = ntk.plan(x)
    if hessian_root is not None and not per_output and C > 1 and uses_kronecker_outer(ntk, x):
        widest = max(network.numels)
        rows = max(1, min(capture_rows(ntk, x), ntk.budget // (2 * 8 * widest)))
        # slices of the captures of all of x when they are held (e.g. kept by outputs()), else a pass per chunk
        for start, xc, caps in capture_chunks(ntk, x, rows, 0, "J^T Lambda J (Kronecker)"):
            root = hessian_root[start : start + xc.num]
            kronecker_outer(plan.units, caps, root, ntk.layout.offsets, out[0])
        return out
    rows = max(1, ntk.budget // (2 * C * P * network.dtype.itemsize))
    inner = network.chunk_size()
    whole = held_captures(ntk, x)  # held captures of x are sliced, not recomputed
    for start, xc in network.chunks(x, rows, desc="J^T J"):
        parts = []
        for s, part in xc.chunks(inner):
            held = None if whole is None else [c[start + s : start + s + part.num] for c in whole]
            parts.append(jacobian(ntk, part, captured=held))
        jac = torch.cat(parts).to(torch.float64)  # shape: (n, C, P)
        if hessian_root is not None:
            jac = torch.einsum("nca,ncp->nap", hessian_root[start : start + jac.shape[0]].to(jac.dtype), jac)
        if per_output:
            out += torch.einsum("ncp,ncq->cpq", jac, jac)
        else:
            add_lower_gram(out[0], jac.reshape(-1, P))  # the symmetric half: half a GEMM's flops
    if not per_output:
        mirror_lower(out[0])
    return out
