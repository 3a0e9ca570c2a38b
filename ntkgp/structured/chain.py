r"""Captures of a plain MLP in closed form: layer inputs and output cotangents without a backward pass.

For an ``nn.Sequential`` of ``nn.Linear`` layers with elementwise activations between them,

.. math::
    z_k = a_k W_k^\top + b_k,\qquad a_{k+1} = \phi_k(z_k),\qquad f = z_K,

the capture of layer :math:`k` (:class:`~ntkgp.structured.capture.UnitCapture`) is its input
:math:`a_k` ``(n, 1, d_in)`` and the cotangents :math:`g_k = \partial f / \partial z_k`
``(n, C, 1, d_out)``, which follow by the backward recursion

.. math::
    g_K = I_C,\qquad g_k = (g_{k+1} W_{k+1}) \odot \phi_k'(z_k),

with :math:`\phi'` in closed form (``tanh``: :math:`1 - a^2`; sigmoid: :math:`a(1 - a)`; ReLU:
:math:`[z > 0]`, as autograd takes it). This is what the generic capture pass computes (one forward,
``C`` backward passes) in ``K`` matrix products and elementwise terms, without autograd: for the
training side (Grams, Jacobians of new points) that saves the backward passes and their overhead;
when the test inputs require grad (the inputs of an acquisition function) no backward pass with
``create_graph`` is taken, and the graph to the inputs is this short chain instead of a
double-backward graph. The values are the same, and so are the input gradients (the exact
derivatives of the same functions). The network's output :math:`f` comes with the captures (no
second forward pass).

:meth:`DenseChain.of` recognizes such networks (exact types only: a subclass of ``nn.Sequential`` or
of a layer may change its ``forward``) and returns ``None`` for every other network, which keeps the
generic capture pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ntkgp.structured.capture import UnitCapture

if TYPE_CHECKING:
    from ntkgp.network.functional import FunctionalNetwork
    from ntkgp.structured.plan import StructuredPlan

__all__ = ["DenseChain"]


def _tanh_slope(z: Tensor, a: Tensor) -> Tensor:
    return 1 - a * a


def _sigmoid_slope(z: Tensor, a: Tensor) -> Tensor:
    return a * (1 - a)


def _relu_slope(z: Tensor, a: Tensor) -> Tensor:
    return (z > 0).to(z.dtype)


#: elementwise activations: (the function, its derivative from the pre-activation z and the value a)
_ACTIVATIONS: dict[type[nn.Module], tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    nn.Tanh: (torch.tanh, _tanh_slope),
    nn.Sigmoid: (torch.sigmoid, _sigmoid_slope),
    nn.ReLU: (torch.relu, _relu_slope),
}


@dataclass(frozen=True)
class _Layer:
    """One ``nn.Linear`` (names of its tensors in :math:`\\theta`) and the activations applied after it."""

    weight: str
    bias: str | None
    activations: tuple[type[nn.Module], ...]


@dataclass(frozen=True)
class DenseChain:
    """A plain MLP (see the module docstring): its layers in order, and the plan's unit of each."""

    layers: tuple[_Layer, ...]
    #: position of each layer's unit in ``plan.units``
    units: tuple[int, ...]

    @classmethod
    def of(cls, network: FunctionalNetwork, plan: StructuredPlan) -> DenseChain | None:
        """The chain of ``network`` if it is a plain MLP whose every tensor is on a dense unit, else ``None``."""
        module = network.module
        if type(module) is not nn.Sequential or network.output_fn is not None or network.fixed:
            return None
        if network.input_shape is None or len(network.input_shape) != 1 or plan.generic:
            return None
        layers: list[_Layer] = []
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                layers.append(_Layer(f"{name}.weight", None if child.bias is None else f"{name}.bias", ()))
            elif type(child) in _ACTIVATIONS and not getattr(child, "inplace", False) and layers:
                last = layers[-1]
                layers[-1] = _Layer(last.weight, last.bias, (*last.activations, type(child)))
            else:
                return None
        if not layers or layers[-1].activations:
            return None
        index = {name: i for i, name in enumerate(network.names)}
        if set(index) != {n for layer in layers for n in (layer.weight, layer.bias) if n is not None}:
            return None
        units = []
        for layer in layers:
            bias = None if layer.bias is None else index[layer.bias]
            found = [
                u
                for u, unit in enumerate(plan.units)
                if unit.is_linear and unit.weight == index[layer.weight] and unit.bias == bias
            ]
            if len(found) != 1:
                return None
            units.append(found[0])
        if sorted(units) != list(range(len(plan.units))):
            return None
        return cls(tuple(layers), tuple(units))

    def propagate(self, params: dict[str, Tensor], x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per layer, in the chain's order, the inputs :math:`a_k` ``(n, d_in)`` and cotangents :math:`g_k`
        ``(n, C, d_out)``, and the outputs ``(n, C)``, for inputs ``x`` ``(n, d)``.

        Differentiable in ``x`` and in nothing else: ``params`` are the frozen :math:`\\hat\\theta`.
        """
        a = x
        inputs, slopes = [], []
        for layer in self.layers:
            inputs.append(a)
            weight = params[layer.weight]
            # shape: (n, d_in) @ (d_in, d_out) -> (n, d_out)
            z = a @ weight.T if layer.bias is None else torch.addmm(params[layer.bias], a, weight.T)
            slope = None
            for kind in layer.activations:
                fn, derivative = _ACTIVATIONS[kind]
                value = fn(z)
                step = derivative(z, value)
                slope = step if slope is None else slope * step
                z = value
            slopes.append(slope)
            a = z
        out = a  # shape: (n, C)
        n, C = out.shape
        g = torch.eye(C, dtype=out.dtype, device=out.device).expand(n, C, C)  # shape: (n, C, d_out of the last)
        cotangents: list[Tensor] = [g]
        for k in range(len(self.layers) - 1, 0, -1):
            slope = slopes[k - 1]
            weight = params[self.layers[k].weight]  # shape: (d_out of layer k, d_out of layer k - 1)
            # shape: (n, C, d_out of layer k - 1); g_K = I: g_K W_K is W_K itself
            g = weight.expand(n, C, weight.shape[1]) if k == len(self.layers) - 1 else g @ weight
            if slope is not None:
                g = g * slope[:, None, :]
            cotangents.append(g)
        cotangents.reverse()
        return inputs, cotangents, out

    def capture(self, params: dict[str, Tensor], x: Tensor) -> tuple[list[UnitCapture], Tensor]:
        """Captures of every unit (in the plan's order) and the outputs ``(n, C)`` for inputs ``x`` ``(n, d)``.

        Differentiable in ``x`` and in nothing else: ``params`` are the frozen :math:`\\hat\\theta`.
        """
        inputs, cotangents, out = self.propagate(params, x)
        result: list[UnitCapture | None] = [None] * len(self.layers)
        for k, unit in enumerate(self.units):
            # shape: inputs (n, 1, d_in), cotangents (n, C, 1, d_out)
            result[unit] = UnitCapture(inputs[k][:, None, :], cotangents[k][:, :, None, :])
        return [c for c in result if c is not None], out
