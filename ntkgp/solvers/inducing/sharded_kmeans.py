r"""k-means inducing points over a process group: the same points as :func:`~ntkgp.solvers.inducing.kmeans_points`
on the concatenated shards, with only the rank's own shard on each rank.

Each step of :func:`~ntkgp.solvers.inducing.kmeans_points` becomes a local step and a small
collective (:class:`~ntkgp.distributed.Sharding`):

* k-means++ seeding: its pool (at most :func:`~ntkgp.solvers.inducing.selection.seeding_pool_size`
  points drawn at random, the same draw on every rank) is gathered on every rank, ``D`` numbers per
  point, and every rank runs the same sequential seeding on it: no collective per seed;
* Lloyd steps: the per-centre sums and counts are all-reduced, ``(M, D + 1)`` numbers per step;
* snapping centres to training points: each rank's 16 nearest candidates per centre are gathered
  and merged, then every rank runs the same greedy assignment.

No rank holds more than its shard, the seeding pool's features, the ``M`` centres and ``M x 16``
candidates per rank. The result is identical on every rank and equals the one-process selection
on the concatenated shards, unless a point is equidistant from two centres to within round-off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.distributed import Sharding
from ntkgp.solvers.inducing.selection import (
    _SNAP_CANDIDATES,
    _row_blocks,
    kmeanspp_centres,
    nearest_candidates,
    seeding_pool,
    smallest,
    snap_to_unused,
    tie_ordered,
)

__all__ = ["sharded_kmeans_points"]


def sharded_kmeans_points(
    x: Tensor, num_inducing: int, generator: torch.Generator | None, sharding: Sharding, iterations: int = 25
) -> Tensor:
    """Global indices of the inducing points, sorted (a CPU tensor), from this rank's features ``x`` ``(n_r, D)``.

    Collective; ``generator`` must be in the same state on every rank (the default, seeded, is).
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    n, m, offset = sharding.total, num_inducing, sharding.offset
    pool = seeding_pool(n, m, generator)
    if pool is None:
        pool = torch.arange(n)
    pool = pool.to(x.device)
    mine = pool[sharding.owned(pool)] - offset  # this rank's pool points
    seeds = sharding.gather_rows(x[mine])  # the pool's features, on every rank, in index order
    centres = kmeanspp_centres(seeds, m, generator)  # the same draws on every rank
    for _ in range(iterations):
        sums = torch.zeros(m, x.shape[1] + 1, dtype=x.dtype, device=x.device)  # coordinates and count
        for _, block in _row_blocks(x, m):
            assign = torch.cdist(block, centres).argmin(-1)
            sums[:, :-1].index_add_(0, assign, block)
            sums[:, -1] += torch.bincount(assign, minlength=m).to(x.dtype)
        sharding.sum_(sums)
        counts = sums[:, -1]
        moved = torch.where(counts[:, None] > 0, sums[:, :-1] / counts.clamp(min=1)[:, None], centres)
        if torch.allclose(moved, centres):
            break
        centres = moved
    k = min(n, _SNAP_CANDIDATES)
    local_d, local_i = nearest_candidates(x, centres, k, offset)
    both = torch.cat([local_d.T, local_i.T.to(x.dtype)])  # shape: (2k, m)
    gathered = sharding.gather_rows(both, [2 * k] * sharding.world_size).reshape(-1, 2, k, m)
    all_d = gathered[:, 0].permute(2, 0, 1).reshape(m, -1)  # shape: (m, W k)
    all_i = gathered[:, 1].permute(2, 0, 1).reshape(m, -1).to(torch.long)
    candidates = tie_ordered(*smallest(all_d, all_i, k))  # rank-major: equal distances by index

    def nearest_unused(c: int, taken: set[int]) -> int:  # over every rank's rows (collective)
        d = (x - centres[c]).square().sum(-1)
        held = [i - offset for i in taken if offset <= i < offset + x.shape[0]]
        d[torch.tensor(held, dtype=torch.long, device=x.device)] = float("inf")
        best = torch.stack([d.min(), (d.argmin() + offset).to(x.dtype)])[None]
        every = sharding.gather_rows(best, [1] * sharding.world_size)  # shape: (W, 2)
        return int(every[int(every[:, 0].argmin()), 1])

    return snap_to_unused(candidates, nearest_unused)
