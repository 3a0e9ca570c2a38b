"""Building ntkgp's internal objects for tests (truth.py stays free of ntkgp)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ntkgp.network import FunctionalNetwork, Inputs
from ntkgp.ntk import EmpiricalNTK, Implementation, NTKProblem, PriorLayout


def make_ntk(
    net: nn.Module,
    x: Any,
    prior_precision: Any = 1.0,
    *,
    budget: int = 2**26,
    chunk_size: int | None = None,
    implementation: str = "structured",
    conv_route: str = "auto",
) -> tuple[EmpiricalNTK, Inputs]:
    """The products engine of ``net`` on inputs ``x`` (probed on them), and ``x`` as :class:`Inputs`."""
    inputs = Inputs.wrap(x)
    network = FunctionalNetwork(net, chunk_size=chunk_size, probe_inputs=inputs)
    layout = PriorLayout.from_spec(network.names, network.numels, prior_precision)
    return EmpiricalNTK(network, layout, budget, Implementation(implementation), conv_route, inputs[:3]), inputs


def make_problem(net: nn.Module, x: Any, prior_precision: Any = 1.0, **kwargs: Any) -> NTKProblem:
    ntk, inputs = make_ntk(net, x, prior_precision, **kwargs)
    return NTKProblem(ntk, inputs)
