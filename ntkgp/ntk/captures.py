r"""Captures of whole inputs for the structured routes: chunked, concatenated, cached.

:func:`captures` runs the capture pass (:func:`ntkgp.structured.capture.capture`) chunk by chunk
(``capture_rows`` examples at a time) and concatenates the per-unit results; :func:`cached_captures`
keeps the result for the two most recent inputs when it fits in a byte limit, so iterative
solvers that multiply by the same training kernel repeatedly pay for it once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ntkgp.network.finite import check_finite_outputs
from ntkgp.network.inputs import Inputs
from ntkgp.network.passes import network_pass, usable
from ntkgp.ntk.engine import EmpiricalNTK
from ntkgp.structured.capture import UnitCapture, capture_with_outputs, differentiable

__all__ = [
    "cached_captures",
    "capture_bytes",
    "capture_chunks",
    "capture_rows",
    "captures",
    "captures_fit",
    "held_captures",
    "rows_within",
    "captures_with_outputs",
]

_DEFAULT_CAPTURE_ENTRIES = 2**25  # entries one capture pass holds at most (with the graph)


def capture_rows(ntk: EmpiricalNTK, x: Inputs) -> int:
    """Examples per capture pass: the network's ``chunk_size``, else about ``2**25`` entries held."""
    fixed = ntk.network.fixed_chunk_size
    if fixed is not None:
        return fixed
    return max(1, _DEFAULT_CAPTURE_ENTRIES // ntk.plan(x).entries_per_example)


def capture_bytes(ntk: EmpiricalNTK, x: Inputs) -> int:
    """Bytes the captures of all of ``x`` hold (inputs, patches and cotangents)."""
    return x.num * ntk.plan(x).entries_per_example * ntk.network.dtype.itemsize


def rows_within(ntk: EmpiricalNTK, x: Inputs, max_bytes: int) -> int:
    """Examples whose captures hold at most ``max_bytes`` (at least one)."""
    return max(1, max_bytes // max(1, ntk.plan(x).entries_per_example * ntk.network.dtype.itemsize))


def captures_fit(ntk: EmpiricalNTK, x: Inputs, max_bytes: int) -> bool:
    """Whether the captures of all of ``x`` are held by the engine's cache or fit in ``max_bytes``."""
    return ntk.captures.get(x) is not None or capture_bytes(ntk, x) <= max_bytes


def captures(ntk: EmpiricalNTK, x: Inputs) -> list[UnitCapture]:
    """Captures of every unit for all of ``x``, one :class:`UnitCapture` per unit."""
    return captures_with_outputs(ntk, x)[0]


def captures_with_outputs(ntk: EmpiricalNTK, x: Inputs) -> tuple[list[UnitCapture], Tensor]:
    """:func:`captures` and the network's outputs :math:`f(x;\\hat\\theta)` ``(n, C)`` from the same passes.

    A plain MLP takes the closed-form route (:class:`~ntkgp.structured.chain.DenseChain`): no backward
    pass (with ``create_graph`` for inputs that require grad, :func:`~ntkgp.structured.capture.differentiable`).
    Raises :class:`~ntkgp.errors.NonFiniteError` on NaN or infinite outputs, as a forward pass does."""
    plan = ntk.plan(x)
    chain = ntk.dense_chain
    network = ntk.network
    parts: list[tuple[list[UnitCapture], Tensor]] = []
    for _, xc in network.chunks(x, capture_rows(ntk, x), desc="captures"):
        if chain is None:
            parts.append(capture_with_outputs(network, plan, xc))
        else:  # a plain MLP has no layer norm to decompose (inputs_graph)
            with network_pass(differentiable(xc)):
                data = xc.to(network.device, network.dtype).map(usable).data
                parts.append(chain.capture(network.params, data))
    out = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
    check_finite_outputs(out)
    if len(parts) == 1:
        return parts[0][0], out
    joined = []
    for i in range(len(plan.units)):
        inputs = [p[0][i].inputs for p in parts]
        whole = None if inputs[0] is None else torch.cat(inputs)  # type: ignore[arg-type]
        joined.append(UnitCapture(whole, torch.cat([p[0][i].cotangents for p in parts])))
    return joined, out


def held_captures(ntk: EmpiricalNTK, x: Inputs) -> list[UnitCapture] | None:
    """The captures of all of ``x`` held by the engine's cache (e.g. kept by :func:`~ntkgp.ntk.products.outputs`),
    or ``None``; never for inputs that require grad (a gradient-free capture must not stand in for them)."""
    return None if differentiable(x) else ntk.captures.get(x)


def cached_captures(ntk: EmpiricalNTK, x: Inputs, max_bytes: int) -> list[UnitCapture] | None:
    """:func:`captures` of ``x`` kept for reuse, or ``None`` when they would hold more than ``max_bytes``
    (then callers capture chunk by chunk). Differentiable captures (inputs that require grad) are
    never cached: they hold a graph, and a cached gradient-free capture must not stand in for them."""
    if differentiable(x):
        return None
    held = held_captures(ntk, x)
    if held is not None:
        return held
    if capture_bytes(ntk, x) > max_bytes:
        return None
    result = captures(ntk, x)
    ntk.captures.put(x, result)
    return result


def capture_chunks(
    ntk: EmpiricalNTK, x: Inputs, rows: int, max_bytes: int, desc: str
) -> Iterator[tuple[int, Inputs, list[UnitCapture]]]:
    """``(start, chunk, its captures)`` over ``x``: slices of the cached whole-data captures when they
    fit in ``max_bytes``, else a capture pass per chunk."""
    whole = cached_captures(ntk, x, max_bytes)
    for start, xc in ntk.network.chunks(x, rows, desc=desc):
        stop = start + xc.num
        yield start, xc, (captures(ntk, xc) if whole is None else [c[start:stop] for c in whole])
