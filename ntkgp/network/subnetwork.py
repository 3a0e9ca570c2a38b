r"""Which parameters are Bayesian: all, the last layer, named modules or parameters, or a predicate.

The chosen tensors form :math:`\theta`; every other parameter is held at its trained value. The
user's ``requires_grad`` flags are read (for the default) but never changed.

* ``None``: every parameter with ``requires_grad=True`` (freeze a body by switching it off);
* ``"last_layer"``: the parameters of the last module, in the order of the forward pass, that
  uses parameters, found by one probe evaluation (the GP is then the last-layer Laplace GP);
* a list of names: each a module name (all its parameters, recursively) or a parameter name, as
  in ``net.named_parameters()``, e.g. ``["layer4", "fc"]``;
* a callable ``(name, param) -> bool``, e.g. ``lambda name, p: "lora_" in name``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["SubnetworkSpec", "select_parameters"]

#: The forms of ``subnetwork=`` (see the module docstring).
SubnetworkSpec: TypeAlias = "None | Literal['last_layer'] | Sequence[str] | Callable[[str, nn.Parameter], bool]"


class _UseOrder(TorchFunctionMode):
    """Records the parameters in the order the forward pass first uses them."""

    def __init__(self, ids: dict[int, str]) -> None:
        super().__init__()
        self.ids: dict[int, str] = ids
        self.order: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for leaf in tree_flatten((args, kwargs or {}))[0]:
            name = self.ids.get(id(leaf)) if isinstance(leaf, Tensor) else None
            if name is not None and name not in self.order:
                self.order.append(name)
        return func(*args, **(kwargs or {}))


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def select_parameters(
    net: nn.Module, spec: SubnetworkSpec, *, probe: Callable[[TorchFunctionMode], None]
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs of :math:`\\theta`, in ``named_parameters()`` order.

    ``probe(mode)`` evaluates the network once under a ``TorchFunctionMode`` (for ``"last_layer"``).
    """
    named = list(net.named_parameters())
    if spec is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "the network has no parameters with requires_grad=True to linearize "
                "(or pass subnetwork= to choose them)"
            )
        return chosen
    if isinstance(spec, str):
        if spec != "last_layer":
            raise ValueError(f"subnetwork must be None, 'last_layer', a list of names or a callable; got {spec!r}")
        recorder = _UseOrder({id(p): n for n, p in named})
        probe(recorder)
        if not recorder.order:
            raise ValueError("subnetwork='last_layer': the forward pass uses no parameters")
        last = _owner(recorder.order[-1])
        keep = {n for n, _ in named if _owner(n) == last}
    elif callable(spec):
        keep = {n for n, p in named if spec(n, p)}
    elif isinstance(spec, Sequence):
        modules = {n for n, _ in net.named_modules() if n}
        keep = set()
        for entry in spec:
            matches = {n for n, _ in named if n == entry or n.startswith(entry + ".")}
            if not matches:
                raise ValueError(
                    f"subnetwork names {entry!r}, which is neither a parameter nor a module with parameters; "
                    f"modules: {sorted(modules)[:12]}{' ...' if len(modules) > 12 else ''}"
                )
            keep |= matches
    else:
        raise TypeError(
            f"subnetwork must be None, 'last_layer', a list of names or a callable; got {type(spec).__name__}"
        )
    chosen = [(n, p) for n, p in named if n in keep]
    if not chosen:
        raise ValueError("subnetwork selects no parameters")
    return chosen
