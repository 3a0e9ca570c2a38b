r"""Which Bayesian tensors take a structured route, found by probing the network.

:func:`discover` evaluates the network on two and on three probe examples under a recording
:class:`~ntkgp.structured.sites.CaptureMode` and decides, per tensor of :math:`\theta`:

* **structured** when every use of it is a structured site of one kind and role (the weight of
  ``F.linear`` calls, the bias of convolutions, ...), each site is batched (its input's leading
  dimension is the number of examples, in both evaluations), and no other call makes a tensor
  from it. A tensor used at several sites (a module called twice, a weight also passed to
  ``F.linear`` elsewhere, the three projections of cross-attention) is exact too: its Jacobian is
  the sum over its sites, and the structured route concatenates their positions;
* **generic** otherwise (per-example Jacobians of just those tensors, :mod:`ntkgp.ntk.generic`).

Structured tensors are grouped into :class:`Unit`\s: a weight and the bias of the same sites
share one unit (their Grams share the cotangent products). The result is a
:class:`StructuredPlan`; :func:`ntkgp.ntk.verify.verify_plan` then compares every structured
tensor's Jacobian with the generic one on the probe examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ntkgp.structured.sites import CaptureMode, Site, SiteKind

if TYPE_CHECKING:
    from ntkgp.network.functional import FunctionalNetwork
    from ntkgp.network.inputs import Inputs

__all__ = ["StructuredPlan", "Unit", "discover", "generic_plan"]


@dataclass(frozen=True)
class Unit:
    r"""Structured tensors sharing their sites: a weight, a bias, or both.

    Attributes
    ----------
    kind:
        ``"dense"``, ``"embedding"`` or ``"affine"`` (:mod:`ntkgp.structured.sites`).
    weight, bias:
        Positions in :math:`\theta` (``None`` when absent or not structured).
    sites:
        Indices of its sites in the evaluation's call order; their positions are concatenated.
    positions:
        ``L``, the positions over all its sites.
    taps:
        ``t``: the width of ``u`` (``d_in k`` for dense, the vocabulary for embeddings, ``d`` for affine).
    width:
        ``d_out``, the width of the sites' outputs per position.
    """

    kind: SiteKind
    weight: int | None
    bias: int | None
    sites: tuple[int, ...]
    positions: int
    taps: int
    width: int

    @property
    def tensors(self) -> tuple[int, ...]:
        return tuple(i for i in (self.weight, self.bias) if i is not None)

    @property
    def is_linear(self) -> bool:
        """A dense map at one position (``nn.Linear`` on ``(n, d_in)``): the factored fast route."""
        return self.kind == "dense" and self.positions == 1


@dataclass(frozen=True)
class StructuredPlan:
    """The structured units and the generic tensors of a network (see the module docstring)."""

    units: tuple[Unit, ...]
    #: positions in θ of the tensors on the generic route
    generic: tuple[int, ...]
    #: signatures of all sites of one evaluation, in call order (captures must match them)
    signatures: tuple[tuple[object, ...], ...]
    #: entries a capture pass holds per example (inputs, patches, cotangents and the graph)
    entries_per_example: int

    @property
    def structured(self) -> tuple[int, ...]:
        """Positions in θ of the tensors on structured routes."""
        return tuple(sorted(i for unit in self.units for i in unit.tensors))

    def owner(self) -> dict[int, tuple[int, bool]]:
        """θ position -> (unit index, is the weight)."""
        return {t: (u, t == unit.weight) for u, unit in enumerate(self.units) for t in unit.tensors}

    def without(self, tensors: set[int]) -> StructuredPlan:
        """The plan with ``tensors`` moved to the generic route."""
        units = []
        for unit in self.units:
            weight = None if unit.weight in tensors else unit.weight
            bias = None if unit.bias in tensors else unit.bias
            if weight is not None or bias is not None:
                units.append(Unit(unit.kind, weight, bias, unit.sites, unit.positions, unit.taps, unit.width))
        generic = tuple(sorted(set(self.generic) | tensors))
        return StructuredPlan(tuple(units), generic, self.signatures, self.entries_per_example)


def generic_plan(network: FunctionalNetwork) -> StructuredPlan:
    """Every tensor on the generic route."""
    return StructuredPlan((), tuple(range(len(network.names))), (), 0)


def _record(network: FunctionalNetwork, x: Inputs) -> tuple[CaptureMode, int]:
    index = {id(t): i for i, t in enumerate(network.params.values())}
    mode = CaptureMode(index, capture=True)
    network.evaluate(x, mode, grad=False)
    for site in mode.sites:  # an input changed in place after its use: its captured copy would be stale
        assert site.source is not None
        if site.source[0]._version != site.source[1]:
            mode.opaque |= {i for i in (site.weight, site.bias) if i is not None}
    return mode, x.num


def discover(network: FunctionalNetwork, probe: Inputs) -> StructuredPlan:
    """Probe the network on its first two and three examples and build the plan."""
    sizes = (2, 3) if probe.num >= 3 else (probe.num,)
    runs = [_record(network, probe[:k]) for k in sizes]
    first, n = runs[-1]
    opaque = set().union(*(mode.opaque for mode, _ in runs))
    signatures = [tuple(s.signature for s in mode.sites) for mode, _ in runs]
    if len(set(signatures)) > 1:  # the call sequence depends on the batch size: no structure
        return generic_plan(network)
    batched = [all(mode.sites[s].lead == k for mode, k in runs) for s in range(len(first.sites))]
    uses: dict[int, list[tuple[int, str]]] = {}
    for s, site in enumerate(first.sites):
        for role, t in (("weight", site.weight), ("bias", site.bias)):
            if t is not None:
                uses.setdefault(t, []).append((s, role))
    ok = {}
    for t, where in uses.items():
        kinds = {(first.sites[s].kind, role) for s, role in where}
        ok[t] = bool(t not in opaque and len(kinds) == 1 and all(batched[s] for s, _ in where))
    units: list[Unit] = []
    paired: set[int] = set()
    for t, where in uses.items():
        if not ok[t] or where[0][1] != "weight":
            continue
        sites = tuple(s for s, _ in where)
        biases = {first.sites[s].bias for s in sites}
        bias = biases.pop() if len(biases) == 1 else None
        if bias is not None and ok.get(bias) and tuple(s for s, _ in uses[bias]) == sites:
            paired.add(bias)
        else:
            bias = None
        units.append(_unit(first.sites, t, bias, sites))
    for t, where in uses.items():
        if ok[t] and where[0][1] == "bias" and t not in paired:
            units.append(_unit(first.sites, None, t, tuple(s for s, _ in where)))
    units.sort(key=lambda u: u.sites[0])
    covered = {i for u in units for i in u.tensors}
    generic = tuple(i for i in range(len(network.names)) if i not in covered)
    per_example = sum(_site_entries(s, network.num_outputs) for s in first.sites) + 2 * first.produced
    return StructuredPlan(tuple(units), generic, signatures[0], max(1, per_example // n))


def _unit(sites: list[Site], weight: int | None, bias: int | None, where: tuple[int, ...]) -> Unit:
    first = sites[where[0]]
    assert first.inputs is not None
    if first.kind == "embedding":
        taps = int(first.extra["vocabulary"])
    else:
        taps = first.inputs.shape[-1]
    positions = 0
    for s in where:
        site_inputs = sites[s].inputs
        assert site_inputs is not None
        positions += int(site_inputs.shape[1])
    assert first.probe is not None and first.to_positions is not None
    width = first.to_positions(first.probe.unsqueeze(1)).shape[-1]  # shape: (n, 1, L, d_out)
    return Unit(first.kind, weight, bias, where, positions, taps, width)


def _site_entries(site: Site, outputs: int) -> int:
    """Entries a capture keeps for ``site``: its canonical input and ``C`` output cotangents."""
    assert site.inputs is not None and site.probe is not None
    return site.inputs.numel() + outputs * site.probe.numel() + site.probe.numel()
