"""The one module of ``benchmarks/`` that imports ntkgp's internals.

The benchmarks time and check pieces that ntkgp does not export at the top level: the products
layer's Gram builder and its block layout (``ntkgp.ntk``, ``ntkgp.structured``), the conv patches,
and the TF32 switch (``ntkgp.precision``). Every script and harness module takes them from here,
so when the library renames or moves one of them, this file is the one to change. The public API
(``ntkgp.LinearizedGP``, ``ntkgp.likelihoods``, ``ntkgp.solvers``, ``ntkgp.marglik``, ...) is
imported where it is used.

Importing this module imports ntkgp. Scripts that keep ntkgp out of a process (or out of a
timed region) until they need it import it inside the function that needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ntkgp.network import FunctionalNetwork
from ntkgp.ntk import EmpiricalNTK, Implementation, PriorLayout, captures, gram
from ntkgp.precision import ieee_float32
from ntkgp.structured import conv_patches, conv_route_costs
from ntkgp.structured.workspace import block_rows, pair_blocks

__all__ = [
    "EmpiricalNTK",
    "conv_route_costs",
    "ieee_float32",
    "make_ntk",
    "module_patches",
    "ntk_gram",
    "structured_factors",
    "structured_layers",
    "symmetric_gram_blocks",
]


def make_ntk(
    net: nn.Module,
    input_shape: Sequence[int],
    x: Tensor,
    *,
    structured: bool = True,
    budget: int = 2**28,
    prior_precision: Any = 1.0,
) -> EmpiricalNTK:
    """The products engine of ``net`` (examples of ``input_shape``; the plan probed on ``x``)."""
    network = FunctionalNetwork(net, tuple(input_shape), probe_inputs=x.reshape(x.shape[0], *input_shape)[:3])
    layout = PriorLayout.from_spec(network.names, network.numels, prior_precision)
    implementation = Implementation.STRUCTURED if structured else Implementation.GENERIC
    probe = network.inputs(x[:3])
    return EmpiricalNTK(network, layout, budget, implementation, probe=probe)


def ntk_gram(ntk: EmpiricalNTK, points: Tensor, budget: int | None = None) -> Tensor:
    """Per-group NTK Grams of ``points`` (flattened or shaped), ``(G, N C, N C)``, float64."""
    engine = ntk if budget is None else ntk.replace(budget=budget)
    return gram(engine, ntk.network.inputs(points))


def structured_factors(ntk: EmpiricalNTK, points: Tensor) -> list[Any]:
    """The structured units' captures (layer inputs and output cotangents) of ``points``."""
    return captures(ntk, ntk.network.inputs(points))


def structured_layers(ntk: EmpiricalNTK) -> list[tuple[str, str]]:
    """``(module name, kind)`` of each structured unit: ``"linear"`` (one position) or ``"conv"``."""
    names = ntk.network.names
    out = []
    for unit in ntk.plan().units:
        name = names[unit.weight if unit.weight is not None else unit.bias]  # type: ignore[index]
        kind = "linear" if unit.is_linear else ("conv" if unit.kind == "dense" else unit.kind)
        out.append((name.rsplit(".", 1)[0], kind))
    return out


def module_patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input patches of a conv module's input ``x``, ``(n, L, d_in k)``."""
    return conv_patches(x, tuple(module.weight.shape[2:]), module.stride, module.padding, module.dilation)


def symmetric_gram_blocks(n: int, outputs: int) -> list[tuple[int, int, int, int]]:
    """The blocks ``(s1, e1, s2, e2)`` of points that ``ntk_gram`` computes for a symmetric ``n``-point Gram.

    Its lower block triangle: :func:`ntkgp.structured.workspace.pair_blocks` with
    :func:`~ntkgp.structured.workspace.block_rows` points per block; the blocks above the diagonal
    are mirrored, not computed.
    """
    return pair_blocks(n, n, block_rows(n, outputs), True)
