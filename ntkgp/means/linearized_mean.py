r"""The prior mean of the linearized network."""

from __future__ import annotations

import torch
from gpytorch.means import Mean
from torch import Tensor

from ntkgp.functional import FunctionalNetwork

__all__ = ["LinearizedMean"]


class LinearizedMean(Mean):
    r"""Prior mean :math:`m(x) = f(x;\hat\theta) - J(x)\,\hat\theta`.

    Under :math:`\theta\sim\mathcal N(0, P_0^{-1})` the linearized network
    :math:`f_{\text{lin}}(x;\theta) = f(x;\hat\theta) + J(x)(\theta-\hat\theta)` has this mean.
    It costs one forward pass and one jvp (tangent :math:`\hat\theta`) per data chunk and has
    no hyperparameters.

    Returns shape ``(N,)`` for a single-output network and ``(N, C)`` otherwise, in the dtype
    of ``x`` (the difference is formed in float64).
    """

    def __init__(self, network: FunctionalNetwork) -> None:
        super().__init__()
        self.network = network  # plain attribute: never a GPyTorch parameter

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        f = self.network.forward(x).to(torch.float64)
        jtheta = self.network.jvp(x, self.network.flat_params.unsqueeze(0))[0].to(torch.float64)
        mean = (f - jtheta).to(x.dtype)
        return mean.squeeze(-1) if self.network.num_outputs == 1 else mean
