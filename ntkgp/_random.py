"""Where random numbers are drawn, and the default generator.

ntkgp never draws from the global RNG: without a ``generator`` argument, a draw uses a fresh CPU
``torch.Generator`` seeded with :data:`DEFAULT_SEED`, so defaults are reproducible and the user's
random stream is left untouched. Draws happen on the generator's own device and are moved to
where they are needed; with a CPU generator results are the same on every device.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_SEED", "default_generator", "draw_device"]

#: Seed of the generator used when none is given (inducing-point selection, subsets, Monte Carlo links).
DEFAULT_SEED = 0


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a new CPU generator seeded with :data:`DEFAULT_SEED`."""
    return torch.Generator().manual_seed(DEFAULT_SEED) if generator is None else generator


def draw_device(generator: torch.Generator | None, default: torch.device | str = "cpu") -> torch.device:
    """The device to draw on with ``generator``: its own, or ``default`` without one."""
    return torch.device(default) if generator is None else generator.device
