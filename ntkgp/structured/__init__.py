r"""Structured Jacobian routes: per-parameter Grams and products from layer inputs and output cotangents.

A Bayesian tensor that enters the network only through maps of a known form (dense maps such as
``F.linear`` and ``F.conv2d``, embedding lookups, the affine parameters of normalization layers)
never needs per-example Jacobians: its NTK contributions follow from what the map acts on and
from the cotangents of the map's output. :mod:`~ntkgp.structured.sites` finds those maps while
the network runs, :mod:`~ntkgp.structured.plan` decides which tensors qualify,
:mod:`~ntkgp.structured.capture` records inputs and cotangents, and :mod:`~ntkgp.structured.linear`,
:mod:`~ntkgp.structured.positions` and :mod:`~ntkgp.structured.products` turn them into Grams,
diagonals and Jacobian products.
"""

from ntkgp.structured.capture import CaptureCache, UnitCapture, capture
from ntkgp.structured.plan import StructuredPlan, Unit, discover, generic_plan
from ntkgp.structured.positions import Route, conv_route_costs
from ntkgp.structured.sites import CaptureMode, Site, conv_patches

__all__ = [
    "CaptureCache",
    "CaptureMode",
    "Route",
    "Site",
    "StructuredPlan",
    "Unit",
    "UnitCapture",
    "capture",
    "conv_patches",
    "conv_route_costs",
    "discover",
    "generic_plan",
]
