"""Where random numbers are drawn.

ntkgp draws on the generator's own device and moves the result to where it is needed. With
the default, a CPU ``torch.Generator``, results are the same on every device; a CUDA generator
works too. Without a generator, draws use the global CPU generator (or, for samples that stay
on a device, that device's).
"""

from __future__ import annotations

import torch

__all__ = ["draw_device"]


def draw_device(generator: torch.Generator | None, default: torch.device | str = "cpu") -> torch.device:
    """The device to draw on with ``generator``: its own, or ``default`` without one."""
    return torch.device(default) if generator is None else generator.device
