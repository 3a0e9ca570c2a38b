"""Partitions of the training data into subsets for the stochastic evidence bound."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp._random import default_generator, draw_device

__all__ = ["class_partition", "random_partition"]


def random_partition(num_data: int, subset_size: int, *, generator: torch.Generator | None = None) -> list[Tensor]:
    """Split ``range(num_data)`` at random into subsets of ``subset_size`` (the last may be smaller).

    Without a ``generator``, one seeded with ``0`` (reproducible; the global RNG is never used).
    """
    if subset_size < 1:
        raise ValueError(f"subset_size must be positive, got {subset_size}")
    generator = default_generator(generator)
    order = torch.randperm(num_data, generator=generator, device=draw_device(generator)).cpu()
    return list(order.split(subset_size))


def class_partition(labels: Tensor, subset_size: int, *, generator: torch.Generator | None = None) -> list[Tensor]:
    """Subsets of ``subset_size`` that each hold points of as few classes as possible.

    Points are shuffled within each class, the classes laid end to end, and the sequence cut
    into consecutive subsets. Grouping by class keeps the strongly correlated points (same
    class, similar NTK features) together, which tightens the bound (Immer et al., 2023). Without
    a ``generator``, one seeded with ``0`` (reproducible; the global RNG is never used).
    """
    if subset_size < 1:
        raise ValueError(f"subset_size must be positive, got {subset_size}")
    generator = default_generator(generator)
    labels = labels.reshape(-1).cpu()
    order = []
    for c in torch.unique(labels):
        members = (labels == c).nonzero().flatten()
        order.append(members[torch.randperm(members.numel(), generator=generator, device=draw_device(generator)).cpu()])
    return list(torch.cat(order).split(subset_size))
