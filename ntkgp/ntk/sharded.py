r"""What the products layer needs across processes: the training points at global indices on every rank.

With a process group (:mod:`ntkgp.distributed`) each rank holds its shard of the training inputs.
The approximate routes need a few chosen points on every rank: the inducing inputs :math:`Z`,
the subset of data, the pivoted-Cholesky pool. :func:`gather_points` collects them (every rank
sends the chosen points it holds), in increasing global index, so that every rank, and a
one-process run on the concatenated shards, sees the same inputs in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk.engine import NTKProblem

__all__ = ["gather_points", "owned_points"]


def owned_points(problem: NTKProblem, indices: Tensor) -> tuple[Tensor, Tensor]:
    """For sorted global point ``indices`` ``(m,)``: the positions in ``indices`` of this rank's points, and
    their indices in its shard (both ``(m_r,)``, on ``indices``' device)."""
    sharding = problem.sharding
    if not sharding.distributed:
        return torch.arange(indices.numel(), device=indices.device), indices
    positions = sharding.owned(indices)
    return positions, indices[positions] - sharding.offset


def gather_points(problem: NTKProblem, indices: Tensor) -> Inputs:
    """The training inputs at the sorted global ``indices`` ``(m,)``, on every rank (collective).

    For one process this is ``problem.x[indices]``. Otherwise every rank contributes the points it
    holds; the shards are contiguous in rank order, so the concatenation is in index order.
    """
    sharding = problem.sharding
    if not sharding.distributed:
        return problem.x[indices]
    _, local = owned_points(problem, indices)
    mine = problem.x[local]
    device = problem.network.device
    counts = sharding.gather_counts(mine.num, device)
    leaves = sorted(mine.tensors(), key=lambda item: repr(item[0]))
    gathered = {key: sharding.gather_rows(t.detach(), counts) for key, t in leaves}
    return mine.map_keys(gathered)
