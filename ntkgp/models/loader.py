r"""Building a GP from a ``DataLoader`` (or any iterable of ``(x, y)`` batches).

The loader is read once, with a progress bar; its inputs (a tensor, a tuple or a dict per batch,
as the network takes them) and targets are joined along the first dimension. The GP keeps the
joined inputs: every route needs them after the build (the prior mean :math:`m(X)` and, for
predictions, the kernel-space cross-kernel :math:`K_{*X}` or the inducing points), and the
products layer then passes over them in chunks, so memory for Jacobians stays bounded whatever
the size of the loader's batches. Shuffling loaders are fine: the GP does not depend on the order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.progress import progress_bar

__all__ = ["collect_batches"]


def collect_batches(loader: Iterable[Any], *, progress: bool = False) -> tuple[Inputs, Tensor]:
    """All ``(x, y)`` batches of ``loader`` joined: the inputs as :class:`Inputs`, the targets ``(N, ...)``."""
    inputs: list[Inputs] = []
    targets: list[Tensor] = []
    for i, batch in enumerate(progress_bar(loader, desc="reading the loader", enable=progress)):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"from_loader needs batches of (x, y); batch {i} is a {type(batch).__name__}"
                + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
            )
        x, y = batch
        x = Inputs.wrap(x, f"the inputs of batch {i}")
        if inputs and inputs[0].same_structure(x) is not None:
            raise ValueError(f"batch {i} of the loader: {inputs[0].same_structure(x)}")
        y = torch.as_tensor(y)
        if y.shape[0] != x.num:
            raise ValueError(f"batch {i} of the loader has {x.num} inputs but {y.shape[0]} targets")
        inputs.append(x)
        targets.append(y)
    if not inputs:
        raise ValueError("the loader yielded no batches")
    return Inputs.concat(inputs), torch.cat(targets)
