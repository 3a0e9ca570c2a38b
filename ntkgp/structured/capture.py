r"""The capture pass: what the structured routes need of each unit, from one forward and ``C`` backward passes.

For a chunk of examples, :func:`capture` evaluates the network once under a capturing
:class:`~ntkgp.structured.sites.CaptureMode` and takes one backward pass per network output
``c`` to the zero probes on the sites' outputs. Per :class:`~ntkgp.structured.plan.Unit` the
result is a :class:`UnitCapture`:

* ``inputs`` :math:`u`: ``(n, L, t)`` (dense), token ids ``(n, L)`` (embedding) or
  :math:`\hat x` ``(n, L, d)`` (affine), positions of all the unit's sites concatenated;
* ``cotangents`` :math:`g_{n,c,l} = \partial f_c(x_n)/\partial z_{n,l}`, ``(n, C, L, d_out)``.

Per-example Jacobians of the network are never formed: a capture costs one forward pass and
``C`` backward passes for the whole chunk, where ``vmap(jacrev)`` costs ``C`` backward passes per
example. :class:`CaptureCache` keeps the whole-data captures of the two most recent inputs.

**Differentiable captures.** When the inputs require grad and grad mode is on (test inputs of an
acquisition function), the pass keeps the graph: site inputs are not detached and the ``C``
backward passes run with ``create_graph=True``, so :math:`u(x)` and :math:`g(x)` (and every
structured product built from them) are differentiable in ``x``. Otherwise (every training-side
capture) the results carry no graph, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ntkgp.network.passes import network_pass
from ntkgp.structured.sites import CaptureMode, Site

if TYPE_CHECKING:
    from ntkgp.network.functional import FunctionalNetwork
    from ntkgp.network.inputs import Inputs
    from ntkgp.structured.plan import StructuredPlan

__all__ = ["CaptureCache", "UnitCapture", "capture", "capture_with_outputs", "differentiable", "slice_captures"]


@dataclass(frozen=True)
class UnitCapture:
    """What one unit's structured products need for ``n`` examples (see the module docstring)."""

    inputs: Tensor | None
    cotangents: Tensor

    def __getitem__(self, rows: slice) -> UnitCapture:
        return UnitCapture(None if self.inputs is None else self.inputs[rows], self.cotangents[rows])

    @property
    def num(self) -> int:
        return self.cotangents.shape[0]


def differentiable(x: Inputs) -> bool:
    """Whether a capture of ``x`` keeps the graph to the inputs (they require grad, grad mode is on)."""
    return torch.is_grad_enabled() and x.requires_grad


def capture(network: FunctionalNetwork, plan: StructuredPlan, x: Inputs) -> list[UnitCapture]:
    """One capture pass over the chunk ``x`` (all of it at once): one :class:`UnitCapture` per unit.

    Differentiable in ``x`` when :func:`differentiable` (see the module docstring)."""
    return capture_with_outputs(network, plan, x)[0]


def capture_with_outputs(
    network: FunctionalNetwork, plan: StructuredPlan, x: Inputs
) -> tuple[list[UnitCapture], Tensor]:
    """:func:`capture`, and the network's outputs :math:`f(x;\\hat\\theta)` ``(n, C)`` of the same pass
    (differentiable in ``x`` when the captures are)."""
    keep_graph = differentiable(x)
    with network_pass(True):  # the backward passes too: out of inference mode, with autograd on
        return _capture(network, plan, x, keep_graph)


def _capture(
    network: FunctionalNetwork, plan: StructuredPlan, x: Inputs, keep_graph: bool
) -> tuple[list[UnitCapture], Tensor]:
    index = {id(t): i for i, t in enumerate(network.params.values())}
    mode = CaptureMode(index, capture=True, keep_graph=keep_graph)
    out = network.evaluate(x, mode)
    signatures = tuple(site.signature for site in mode.sites)
    if signatures != plan.signatures:
        raise RuntimeError(
            "the network called its structured layers differently on these inputs than on the probe examples "
            f"({len(signatures)} calls against {len(plan.signatures)}); build the GP with "
            "implementation='generic' for networks whose call sequence depends on the data"
        )
    used = sorted({s for unit in plan.units for s in unit.sites})
    probes = [_probe(mode.sites[s]) for s in used]
    C = out.shape[1]
    per_output = []
    for c in range(C):
        grads = torch.autograd.grad(
            out[:, c].sum(), probes, retain_graph=keep_graph or c < C - 1, create_graph=keep_graph, allow_unused=True
        )
        per_output.append([torch.zeros_like(p) if g is None else g for p, g in zip(probes, grads)])
    cotangents = {}
    for j, s in enumerate(used):
        site = mode.sites[s]
        assert site.to_positions is not None
        # shape: per output (n, *out) -> (n, C, *out) -> (n, C, L, d_out)
        cotangents[s] = site.to_positions(torch.stack([g[j] for g in per_output], 1))
    result = []
    for unit in plan.units:
        cot = torch.cat([cotangents[s] for s in unit.sites], 2) if len(unit.sites) > 1 else cotangents[unit.sites[0]]
        inputs = None
        if unit.weight is not None:
            parts = [mode.sites[s].inputs for s in unit.sites]
            inputs = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # type: ignore[arg-type]
        result.append(UnitCapture(inputs, cot if keep_graph else cot.detach()))
    return result, (out if keep_graph else out.detach())


def _probe(site: Site) -> Tensor:
    assert site.probe is not None
    return site.probe


def slice_captures(captures: list[UnitCapture], rows: slice) -> list[UnitCapture]:
    return [c[rows] for c in captures]


def _key(x: Inputs) -> tuple[tuple[int, int], ...]:
    return tuple((id(t), t._version) for _, t in x.tensors())


class CaptureCache:
    """Whole-data captures of the two most recent inputs, reused while their tensors are unchanged.

    Iterative solvers multiply by the same training kernel hundreds of times; its captures are
    one forward and ``C`` backward passes that need not be repeated. An entry holds its input
    tensors and is reused only for those same tensor objects at the same version counters:
    changing one in place invalidates the entry, and a new tensor that happens to get the freed
    storage of an old one (the CUDA caching allocator reuses blocks) is never mistaken for it.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[Inputs, tuple[tuple[int, int], ...], list[UnitCapture]]] = []

    def get(self, x: Inputs) -> list[UnitCapture] | None:
        key = _key(x)
        for i, (_held, held_key, captures) in enumerate(self._entries):
            if held_key == key:
                self._entries.insert(0, self._entries.pop(i))
                return captures
        return None

    def put(self, x: Inputs, captures: list[UnitCapture]) -> None:
        self._entries = [(x, _key(x), captures), *self._entries[:1]]

    def clear(self) -> None:
        self._entries = []
