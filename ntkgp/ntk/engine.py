r"""What every NTK product needs, in one object: the network, the prior layout, a memory budget, the routes.

:class:`EmpiricalNTK` is the first argument of every function of the products layer
(:mod:`ntkgp.ntk`). It holds the network (:class:`~ntkgp.network.FunctionalNetwork`), the prior
layout (:class:`~ntkgp.ntk.layout.PriorLayout`), the memory budget for Jacobian blocks, and the
route choices, as neural-tangents' ``NtkImplementation`` does:

* :class:`Implementation`: ``STRUCTURED`` (default; structured routes where a parameter qualifies,
  :mod:`ntkgp.structured`, and per-example Jacobians for the rest) or ``GENERIC`` (per-example
  Jacobians for every parameter; the reference the structured routes are tested against);
* ``conv_route``: ``"auto"`` (cheaper by estimated cost), ``"gradient"`` or ``"spatial"`` for the
  weight blocks of units at many positions (:mod:`ntkgp.structured.positions`).

It also owns the structured plan (found once, on first use, by probing the network on its first
training examples, and verified against the generic route) and a cache of captures.

:class:`NTKProblem` adds the training inputs: it is what the solvers take.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ntkgp.distributed import ONE_PROCESS, Sharding
from ntkgp.network.functional import FunctionalNetwork
from ntkgp.network.inputs import Inputs
from ntkgp.ntk.layout import PriorLayout
from ntkgp.structured.capture import CaptureCache
from ntkgp.structured.chain import DenseChain
from ntkgp.structured.plan import StructuredPlan, discover, generic_plan
from ntkgp.structured.positions import Route

__all__ = ["EmpiricalNTK", "Implementation", "NTKProblem"]


class Implementation(enum.Enum):
    """How Jacobian products are computed (see the module docstring)."""

    STRUCTURED = "structured"
    GENERIC = "generic"


@dataclass(eq=False)
class EmpiricalNTK:
    """The network, its prior layout, the budget and the routes of every NTK product.

    Parameters
    ----------
    network:
        The linearized network.
    layout:
        The prior's layout over :math:`\\theta` (groups of tensors).
    budget:
        Bytes for Jacobian blocks in chunked passes (two generic blocks are held at once).
    implementation:
        ``Implementation.STRUCTURED`` (default) or ``Implementation.GENERIC`` (or their values).
    conv_route:
        ``"auto"``, ``"gradient"`` or ``"spatial"``.
    probe:
        Example inputs for finding the structured plan (the first training examples); without
        them the plan is found on the first inputs a product is asked for.
    """

    network: FunctionalNetwork
    layout: PriorLayout
    budget: int
    implementation: Implementation = Implementation.STRUCTURED
    conv_route: Route = "auto"
    probe: Inputs | None = None
    captures: CaptureCache = field(default_factory=CaptureCache, repr=False)
    _plan: StructuredPlan | None = field(default=None, repr=False)
    _chain: DenseChain | None = field(default=None, repr=False)
    _chain_checked: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.implementation = Implementation(self.implementation)
        if self.conv_route not in ("auto", "gradient", "spatial"):
            raise ValueError(f"conv_route must be 'auto', 'gradient' or 'spatial', got {self.conv_route!r}")
        if self.layout.names != self.network.names:
            raise ValueError("the prior layout does not describe the network's parameter tensors")

    @property
    def num_outputs(self) -> int:
        """C."""
        return self.network.num_outputs

    def plan(self, x: Inputs | None = None) -> StructuredPlan:
        """The structured plan (found on first use from ``probe``, else ``x``; then verified)."""
        if self._plan is None:
            if self.implementation is Implementation.GENERIC or not self.network.dtype.is_floating_point:
                self._plan = generic_plan(self.network)
            else:
                probe = self.probe if self.probe is not None else x
                if probe is None:
                    raise RuntimeError("the structured plan needs example inputs")
                from ntkgp.ntk.verify import verify_plan

                self._plan = verify_plan(self, discover(self.network, probe[:3]), probe[:3])
                if self._plan.units:  # activations per example, which bound every pass's chunk
                    self.network.example_entries = max(1, self._plan.entries_per_example // self.network.num_outputs)
        return self._plan

    @property
    def dense_chain(self) -> DenseChain | None:
        """The closed-form captures of a plain MLP (:mod:`ntkgp.structured.chain`), ``None`` for other networks
        and while the plan is being found (its verification takes the capture pass)."""
        if self._plan is None or self.implementation is Implementation.GENERIC:
            return None
        if not self._chain_checked:
            self._chain = DenseChain.of(self.network, self._plan)
            self._chain_checked = True
        return self._chain

    @cached_property
    def tensor_group(self) -> tuple[int, ...]:
        return self.layout.tensor_group

    def replace(self, **changes: Any) -> EmpiricalNTK:
        """A copy with other settings (a new plan and cache where the routes change)."""
        values: dict[str, Any] = {
            "network": self.network,
            "layout": self.layout,
            "budget": self.budget,
            "implementation": self.implementation,
            "conv_route": self.conv_route,
            "probe": self.probe,
        }
        values.update(changes)
        keep_plan = all(values[k] == getattr(self, k) for k in ("network", "implementation"))
        new = EmpiricalNTK(**values)
        if keep_plan:
            new._plan = self._plan
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["captures"] = CaptureCache()  # captures are a cache: rebuilt on demand
        state.pop("tensor_group", None)
        return state


@dataclass(frozen=True, eq=False)
class NTKProblem:
    """The NTK on the training inputs: what a solver is built on.

    Attributes
    ----------
    ntk:
        The products engine.
    x:
        The training inputs, ``N`` examples (with a process group: this rank's shard).
    sharding:
        How the training data are split over processes (:mod:`ntkgp.distributed`); one process by
        default. Solvers sum over data with ``sharding.sum`` and size global quantities by
        :attr:`total_data`.
    """

    ntk: EmpiricalNTK
    x: Inputs
    sharding: Sharding = ONE_PROCESS

    @property
    def network(self) -> FunctionalNetwork:
        return self.ntk.network

    @property
    def layout(self) -> PriorLayout:
        return self.ntk.layout

    @property
    def budget(self) -> int:
        return self.ntk.budget

    @property
    def num_data(self) -> int:
        """N (with a process group: the points of this rank's shard)."""
        return self.x.num

    @property
    def total_data(self) -> int:
        """N over all ranks (``num_data`` for one process)."""
        return self.sharding.total if self.sharding.distributed else self.x.num

    @property
    def total_size(self) -> int:
        """N C over all ranks."""
        return self.total_data * self.ntk.num_outputs

    @property
    def num_outputs(self) -> int:
        """C."""
        return self.ntk.num_outputs

    @property
    def size(self) -> int:
        """M = N C, the side of the training covariance (with a process group: this rank's rows)."""
        return self.x.num * self.ntk.num_outputs

    def on(self, x: Inputs) -> NTKProblem:
        """The same NTK on other training inputs (a subset, say), in one process."""
        return NTKProblem(self.ntk, x)
