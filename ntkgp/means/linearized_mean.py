r"""The prior mean of the linearized network."""

from __future__ import annotations

from typing import Any

import torch
from gpytorch.means import Mean
from torch import Tensor

from ntkgp.network.inputs import InputLike
from ntkgp.ntk import EmpiricalNTK, outputs_and_pushforward

__all__ = ["LinearizedMean"]


class LinearizedMean(Mean):
    r"""Prior mean :math:`m(x) = f(x;\hat\theta) - J(x)\,\hat\theta`.

    Under :math:`\theta\sim\mathcal N(0, P_0^{-1})` the linearized network
    :math:`f_{\text{lin}}(x;\theta) = f(x;\hat\theta) + J(x)(\theta-\hat\theta)` has this mean.
    It costs one forward pass and one jvp (tangent :math:`\hat\theta`) per data chunk (a plain MLP: one
    closed-form capture pass, :func:`~ntkgp.ntk.products.outputs_and_pushforward`) and has no hyperparameters.

    Returns shape ``(N,)`` for a single-output network and ``(N, C)`` otherwise, in float64 (the
    difference is formed in float64), or in the dtype of floating tensor inputs.
    """

    def __init__(self, ntk: EmpiricalNTK) -> None:
        super().__init__()
        self.ntk = ntk  # plain attribute: never a GPyTorch parameter

    def __call__(self, x: InputLike, *args: Any, **kwargs: Any) -> Tensor:
        """Tensors go through GPyTorch's ``Mean.__call__``; other input forms straight to :meth:`forward`."""
        if isinstance(x, Tensor):
            return super().__call__(x, *args, **kwargs)
        return self.forward(x)

    def forward(self, x: InputLike) -> Tensor:
        network = self.ntk.network
        inputs = network.inputs(x)
        f, jtheta = outputs_and_pushforward(self.ntk, inputs, network.flat_params.unsqueeze(0))
        mean = f.to(torch.float64) - jtheta[0].to(torch.float64)
        dtype = inputs.float_dtype if isinstance(x, Tensor) and x.is_floating_point() else None
        mean = mean if dtype is None else mean.to(dtype)
        return mean.squeeze(-1) if network.num_outputs == 1 else mean
