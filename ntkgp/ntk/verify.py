r"""Checking every structured unit against autograd before it is used.

The structured routes rest on assumptions about how a parameter enters the network (a map of
known form, applied per example). :func:`verify_plan` checks them where it matters: for each unit,
it compares :math:`J^\top u` from the captures (:func:`~ntkgp.structured.products.unit_pullback`) with
a ``torch.func`` vjp on that unit's tensors, for a random cotangent on the probe examples. A unit
that disagrees beyond round-off (relative error above :math:`\sqrt{\epsilon}` of the dtype) moves
to the generic route, with a warning naming its tensors: a wrong number is never returned, at
worst a slower one.
"""

from __future__ import annotations

import warnings

import torch

from ntkgp.network.inputs import Inputs
from ntkgp.ntk.engine import EmpiricalNTK
from ntkgp.structured.capture import capture
from ntkgp.structured.plan import StructuredPlan
from ntkgp.structured.products import unit_pullback

__all__ = ["verify_plan"]


def verify_plan(ntk: EmpiricalNTK, plan: StructuredPlan, probe: Inputs) -> StructuredPlan:
    """``plan`` with the units whose Jacobian disagrees with autograd's moved to the generic route."""
    if not plan.units:
        return plan
    network = ntk.network
    caps = capture(network, plan, probe)
    generator = torch.Generator().manual_seed(0)
    tolerance = torch.finfo(network.dtype).eps ** 0.5
    failed: set[int] = set()
    errors = []
    cotangent = torch.randn(1, probe.num, network.num_outputs, generator=generator, dtype=torch.float64).to(
        device=network.device, dtype=network.dtype
    )
    for unit, cap in zip(plan.units, caps):
        tensors = list(unit.tensors)
        pulled = unit_pullback(unit, cap, cotangent)
        structured = torch.cat([pulled[t] for t in tensors], 1)
        reference = network.vjp(probe, cotangent, tensors)
        error = float((structured - reference).norm()) / max(float(reference.norm()), torch.finfo(network.dtype).tiny)
        if not error <= tolerance:
            failed |= set(tensors)
            errors.append(f"{', '.join(network.names[t] for t in tensors)} (relative error {error:.2g})")
    if not failed:
        return plan
    warnings.warn(
        "ntkgp's structured Jacobian of " + "; ".join(errors) + " disagrees with autograd on the probe examples; "
        "these tensors take the generic route (exact, slower). Please report the layer.",
        stacklevel=2,
    )
    return plan.without(failed)
