"""Checks on user input that turn silent wrong answers into clear errors."""

from __future__ import annotations

import torch
from gpytorch.likelihoods import (
    FixedNoiseGaussianLikelihood,
    GaussianLikelihood,
    Likelihood,
    MultitaskGaussianLikelihood,
)
from torch import Tensor

__all__ = ["check_likelihood", "check_module_device", "check_targets"]


def check_module_device(module: torch.nn.Module, name: str, device: torch.device) -> None:
    """Every parameter and buffer of ``module`` must be on ``device`` (the network's)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device != device:
            raise ValueError(
                f"the {name} is on {tensor.device} but the network is on {device}; "
                f"move it with {name}.to({str(device)!r})"
            )


def check_targets(y: Tensor, num_data: int, num_outputs: int, device: torch.device) -> Tensor:
    """Validate regression targets and return them as a floating tensor of shape ``(N,)``
    (one output) or ``(N, C)``."""
    if not isinstance(y, Tensor):
        raise TypeError(f"train_y must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        y = y.to(torch.get_default_dtype())
    if num_outputs == 1 and y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    expected = (num_data,) if num_outputs == 1 else (num_data, num_outputs)
    if tuple(y.shape) != expected:
        raise ValueError(
            f"train_y has shape {tuple(y.shape)} but the network has {num_outputs} output(s) for "
            f"{num_data} training inputs, so train_y must have shape {expected}"
        )
    if not torch.isfinite(y).all():
        raise ValueError("train_y contains NaN or infinite values")
    if y.device != device:
        raise ValueError(f"train_y is on {y.device} but the network is on {device}")
    return y


def check_likelihood(likelihood: Likelihood, num_outputs: int, num_data: int) -> None:
    """The likelihood must be a Gaussian one whose number of tasks matches the network, and a fixed
    noise must have one value per training point (or one in all)."""
    if isinstance(likelihood, MultitaskGaussianLikelihood):
        if likelihood.num_tasks != num_outputs:
            raise ValueError(
                f"MultitaskGaussianLikelihood has num_tasks={likelihood.num_tasks} but the network "
                f"has {num_outputs} outputs"
            )
        if likelihood.rank != 0:
            raise NotImplementedError(
                "MultitaskGaussianLikelihood with rank > 0 (correlated task noise) is not supported "
                "by the exact solvers; use rank=0"
            )
        return
    if isinstance(likelihood, FixedNoiseGaussianLikelihood):
        count = likelihood.noise.numel()
        if count not in (1, num_data):
            raise ValueError(
                f"FixedNoiseGaussianLikelihood has {count} noise values but there are {num_data} training "
                "points; give one noise value per training point"
            )
    if isinstance(likelihood, (GaussianLikelihood, FixedNoiseGaussianLikelihood)):
        if num_outputs != 1:
            raise ValueError(
                f"{type(likelihood).__name__} is for single-output networks but the network has "
                f"{num_outputs} outputs; use MultitaskGaussianLikelihood(num_tasks={num_outputs})"
            )
        return
    raise TypeError(
        f"LinearizedGP supports Gaussian likelihoods (GaussianLikelihood, FixedNoiseGaussianLikelihood, "
        f"MultitaskGaussianLikelihood); got {type(likelihood).__name__}"
    )
