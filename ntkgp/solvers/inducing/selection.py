r"""Inducing inputs chosen among the training points.

Three rules, each returning sorted indices into the training inputs:

* :func:`random_points`: uniformly without replacement;
* :func:`kmeans_points`: k-means (k-means++ start, Lloyd steps) on the flattened inputs, each
  centre replaced by its nearest unused training point;
* :func:`pivoted_cholesky_points`: greedy pivoted Cholesky of the NTK, point by point (all ``C``
  outputs of a point at once): each step takes the point whose ``C x C`` block of the residual
  kernel :math:`K - K_{\cdot Z}K_{ZZ}^{-1}K_{Z\cdot}` has the largest trace. This maximises the
  trace of the Nystrom kernel greedily and is the choice that makes the collapsed bound tight
  fastest. The greedy search runs on a candidate pool (all points when there are few, else a
  random subset of ``max(pool_size / C, 2 M)`` points), whose dense NTK Gram is formed once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from ntkgp._random import default_generator, draw_device
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import NTKProblem
from ntkgp.ntk import gram as ntk_gram
from ntkgp.ntk.sharded import gather_points

#: The selection rules by name.
SelectionRule: TypeAlias = Literal["auto", "kmeans", "pivoted_cholesky", "random"]

__all__ = [
    "SelectionRule",
    "check_count",
    "checked_indices",
    "kmeans_points",
    "pivoted_cholesky_points",
    "random_points",
    "select_inducing_points",
]

#: default candidate pool of the pivoted-Cholesky search, in kernel rows (points x outputs)
DEFAULT_POOL_SIZE = 4000


def checked_indices(indices: Tensor, num_data: int, what: str) -> Tensor:
    """User-given point indices as a sorted CPU tensor, after checking they are distinct and in
    ``range(num_data)`` (``what`` names them in the error)."""
    idx = indices.to(torch.long).cpu().reshape(-1)
    if idx.numel() == 0 or idx.min() < 0 or idx.max() >= num_data or idx.unique().numel() != idx.numel():
        raise ValueError(f"{what} indices must be distinct and in [0, {num_data}); got {idx.numel()} indices")
    return idx.sort().values


def check_count(count: int, num_data: int, name: str) -> None:
    """Raise a ``ValueError`` unless ``1 <= count <= num_data`` (``name`` names the setting)."""
    if not 1 <= count <= num_data:
        raise ValueError(f"{name} must be in [1, N={num_data}], got {count}")


def random_points(num_data: int, num_inducing: int, generator: torch.Generator | None = None) -> Tensor:
    """``num_inducing`` distinct indices in ``range(num_data)``, sorted (a CPU tensor)."""
    perm = torch.randperm(num_data, generator=generator, device=draw_device(generator)).cpu()
    return perm[:num_inducing].sort().values


#: entries of one block of point-to-centre distances in :func:`kmeans_points` (2 MiB of float64: cache-sized
#: blocks made a Lloyd step 2x faster than 256 MiB ones, N = 50,000, M = 500, one thread; cdist's values do
#: not depend on the block)
_KMEANS_BLOCK_ELEMENTS = 2**18
#: nearest training points kept per centre when centres are snapped to distinct training points
_SNAP_CANDIDATES = 16
#: relative gap below which two candidate distances are a tie (:func:`tie_ordered`)
_TIE = 1e-9


def _row_blocks(x: Tensor, width: int) -> Iterator[tuple[int, Tensor]]:
    """``(start, rows)`` blocks of ``x`` with about ``_KMEANS_BLOCK_ELEMENTS / width`` rows each."""
    step = max(1, _KMEANS_BLOCK_ELEMENTS // max(1, width))
    for start in range(0, x.shape[0], step):
        yield start, x[start : start + step]


def _draw(weights: Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to ``weights`` (inverse CDF; the uniform from ``generator``)."""
    cdf = torch.cumsum(weights, 0)
    if not cdf[-1] > 0:
        cdf = torch.arange(1, weights.shape[0] + 1, dtype=weights.dtype, device=weights.device)
    u = torch.rand((), generator=generator, device=draw_device(generator), dtype=torch.float64).cpu()
    return int(torch.searchsorted(cdf, (u * cdf[-1].cpu()).to(cdf.device)).clamp(max=weights.shape[0] - 1))


def tie_ordered(distances: Tensor, indices: Tensor) -> list[list[int]]:
    """Each row's candidate point ``indices`` ``(m, k)`` by increasing ``distances`` ``(m, k)``, distances within
    :data:`_TIE` of the row's largest finite one counting as equal and ordered by index (so that round-off, which
    differs between a one-process and a sharded run, never decides a tie such as a two-point cluster's midpoint).
    Negative indices (padding) are dropped."""
    out = []
    for d_row, i_row in zip(distances.cpu().tolist(), indices.cpu().tolist()):
        pairs = sorted((d, i) for d, i in zip(d_row, i_row) if i >= 0 and d != float("inf"))
        tol = _TIE * max((d for d, _ in pairs), default=0.0)
        row: list[int] = []
        group: list[int] = []
        start = 0.0
        for d, i in pairs:
            if group and d - start > tol:
                row += sorted(group)
                group = []
            if not group:
                start = d
            group.append(i)
        out.append(row + sorted(group))
    return out


#: k-means++ seeds from at most this many points, or ``_SEED_POOL_PER_CENTRE`` per centre if more
_SEED_POOL = 10_000
_SEED_POOL_PER_CENTRE = 20


def seeding_pool_size(num_data: int, num_inducing: int) -> int:
    """Points k-means++ seeds from: all ``num_data`` up to ``max(10,000, 20 M)``, else that many at random.

    Seeding is sequential (``M`` passes over the points it draws from), Lloyd steps are not: from
    a sample it costs ``O(M^2)`` passes of a fixed size instead of ``M`` passes over all ``N``
    points (over processes, ``2M`` collectives fewer), and the Lloyd steps on all points follow.
    """
    return min(num_data, max(_SEED_POOL, _SEED_POOL_PER_CENTRE * num_inducing))


def seeding_pool(num_data: int, num_inducing: int, generator: torch.Generator | None) -> Tensor | None:
    """The sorted indices k-means++ seeds from (a CPU tensor), or ``None`` for all points."""
    size = seeding_pool_size(num_data, num_inducing)
    return None if size >= num_data else random_points(num_data, size, generator)


def kmeanspp_centres(x: Tensor, num_inducing: int, generator: torch.Generator | None) -> Tensor:
    """k-means++ seeds ``(M, D)`` among the rows of ``x`` ``(n, D)``: each drawn with probability proportional
    to its squared distance to the nearest seed drawn before."""
    centres = x[_draw(torch.ones(x.shape[0], dtype=x.dtype, device=x.device), generator)][None]
    closest = (x - centres).square().sum(-1)
    for _ in range(1, num_inducing):  # k-means++: sample proportional to the squared distance
        new = x[_draw(closest, generator)][None]
        centres = torch.cat([centres, new])
        closest = torch.minimum(closest, (x - new).square().sum(-1))
    return centres


def kmeans_points(
    x: Tensor, num_inducing: int, generator: torch.Generator | None = None, iterations: int = 25
) -> Tensor:
    """Indices of the training points nearest to k-means centres of ``x`` ``(N, D)``, sorted (a CPU tensor).

    k-means++ seeding (on a uniform random subset of :func:`seeding_pool_size` points when there are
    more), then at most ``iterations`` Lloyd steps on all points, all in float64 on ``x``'s device,
    with point-to-centre distances in row blocks of about 2**18 entries (no ``N x M`` matrix).
    Each centre, in order, is then replaced by its nearest training point not already taken (ties,
    to within a relative 1e-9, to the lower index).
    Random draws come from ``generator`` on its own device; with a CPU generator the result does not
    depend on the device of ``x``.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    n, m = x.shape[0], num_inducing
    pool = seeding_pool(n, m, generator)
    centres = kmeanspp_centres(x if pool is None else x[pool.to(x.device)], m, generator)
    for _ in range(iterations):
        sums = torch.zeros_like(centres)
        counts = torch.zeros(m, dtype=x.dtype, device=x.device)
        for _, block in _row_blocks(x, m):
            assign = torch.cdist(block, centres).argmin(-1)
            sums.index_add_(0, assign, block)
            counts += torch.bincount(assign, minlength=m).to(x.dtype)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        if torch.allclose(moved, centres):
            break
        centres = moved
    best_d, best_i = nearest_candidates(x, centres, min(n, _SNAP_CANDIDATES))

    def nearest_unused(c: int, taken: set[int]) -> int:
        d = (x - centres[c]).square().sum(-1)
        d[torch.tensor(sorted(taken), dtype=torch.long, device=x.device)] = float("inf")
        return int(d.argmin())

    return snap_to_unused(tie_ordered(best_d, best_i), nearest_unused)


def smallest(distances: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest ``distances`` of each row ``(m, w)`` with their ``indices``, ``(m, k)`` each, ordered by
    distance and, among equal distances, by position. A stable sort: ``topk`` keeps an arbitrary subset of equal
    entries, so copies of one training point would be kept differently by a one-process and a sharded run."""
    order = distances.sort(dim=1, stable=True).indices[:, :k]
    return distances.gather(1, order), indices.gather(1, order)


def nearest_candidates(x: Tensor, centres: Tensor, k: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest points of ``x`` ``(n, D)`` to each centre, merged over row blocks: distances and indices
    (``offset`` plus the row) ``(m, k)``, by distance and then index, padded with ``inf`` / ``-1`` when ``n < k``."""
    m = centres.shape[0]
    best_d = torch.full((m, 0), float("inf"), dtype=x.dtype, device=x.device)
    best_i = torch.zeros((m, 0), dtype=torch.long, device=x.device)
    for start, block in _row_blocks(x, m):
        rows = torch.arange(offset + start, offset + start + block.shape[0], device=x.device).expand(m, -1)
        best_d, best_i = smallest(torch.cat([best_d, torch.cdist(centres, block)], 1), torch.cat([best_i, rows], 1), k)
    pad = k - best_d.shape[1]
    if pad:
        best_d = torch.cat([best_d, torch.full((m, pad), float("inf"), dtype=x.dtype, device=x.device)], 1)
        best_i = torch.cat([best_i, torch.full((m, pad), -1, dtype=torch.long, device=x.device)], 1)
    return best_d, best_i


def snap_to_unused(candidates: list[list[int]], nearest_unused: Callable[[int, set[int]], int]) -> Tensor:
    """The nearest unused training point to each centre, as sorted indices ``(m,)`` on the CPU.

    ``candidates[c]`` are centre ``c``'s nearest training points, nearest first (:func:`tie_ordered`);
    when every one is taken, ``nearest_unused(c, taken)`` searches the whole data. Centres are served
    in order, so every process of a sharded selection, holding the same candidates, makes the same
    calls in the same order.
    """
    chosen: list[int] = []
    taken: set[int] = set()
    for c, row in enumerate(candidates):
        pick = next((i for i in row if i not in taken), None)
        if pick is None:  # all candidates taken
            pick = nearest_unused(c, taken)
        taken.add(pick)
        chosen.append(pick)
    return torch.tensor(sorted(chosen), dtype=torch.long, device="cpu")


def pivoted_cholesky_points(
    problem: NTKProblem,
    num_inducing: int,
    delta: Tensor,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-10,
) -> Tensor:
    r"""Greedy point-block pivoted Cholesky of the NTK :math:`K(\delta)` (see the module docstring).

    Stops early, returning fewer points, once the largest residual trace falls below
    ``tolerance`` times the largest prior trace (the NTK's rank on the pool is exhausted).
    Cost: the pool's Gram ``(n C)^2`` and ``O(n C \cdot (M C)^2)`` for the factorization.
    """
    n, C = problem.total_data, problem.num_outputs
    pool_size = max(pool_size // C, 2 * num_inducing)  # pool_size counts kernel rows (points x C)
    pool = torch.arange(n, device="cpu") if n <= pool_size else random_points(n, pool_size, generator)
    # shape: (n_pool C, n_pool C); with a process group the pool's points are gathered on every rank
    gram = ntk_gram(problem.ntk, gather_points(problem, pool), weights=delta.to(torch.float64).reciprocal())
    size = pool.shape[0]
    m = min(num_inducing, size)
    factor = torch.zeros(size * C, m * C, dtype=torch.float64, device=gram.device)
    residual = gram.diagonal().reshape(size, C).sum(-1).clone()  # residual trace per point
    scale = float(residual.max())
    chosen: list[int] = []
    for j in range(m):
        i = int(residual.argmax())
        if residual[i] <= tolerance * scale:
            break
        rows = slice(i * C, (i + 1) * C)
        col = gram[:, rows] - factor[:, : j * C] @ factor[rows, : j * C].T  # shape: (n_pool C, C)
        pivot = col[rows]
        pivot = 0.5 * (pivot + pivot.T)
        lower = torch.linalg.cholesky_ex(pivot)[0]
        if not torch.isfinite(lower).all() or (lower.diagonal() <= 0).any():
            residual[i] = -float("inf")  # numerically dependent block: skip the point
            continue
        new = torch.linalg.solve_triangular(lower, col.T, upper=False).T  # shape: (n_pool C, C)
        factor[:, j * C : (j + 1) * C] = new
        residual = residual - new.square().reshape(size, C, C).sum((1, 2))
        residual[i] = -float("inf")
        chosen.append(i)
    return pool[torch.tensor(chosen, dtype=torch.long, device="cpu")].sort().values


def _float_features(x: Inputs) -> Tensor | None:
    """The floating-point leaves of ``x``, flattened and concatenated, ``(N, D)``; ``None`` without any."""
    leaves = [t.reshape(t.shape[0], -1) for _, t in x.tensors() if t.is_floating_point()]
    return torch.cat(leaves, 1) if leaves else None


def select_inducing_points(
    selection: SelectionRule | Tensor,
    problem: NTKProblem,
    num_inducing: int,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the inducing points by rule name or given directly as an index tensor.

    ``"auto"`` is ``"kmeans"`` on the floating-point inputs, or ``"random"`` when the inputs have
    none (token ids). Without a ``generator`` the draws come from a generator seeded with
    :data:`~ntkgp._random.DEFAULT_SEED`: reproducible, and the global RNG is left untouched.

    With a process group (a sharded ``problem``) the indices are global (the ranks' shards one
    after the other), the same on every rank and the same as one process on the concatenated
    shards: k-means runs sharded (:mod:`~ntkgp.solvers.inducing.sharded_kmeans`), the pivoted
    Cholesky pool is gathered. A given ``generator`` must be in the same state on every rank.
    """
    n = problem.total_data
    if isinstance(selection, Tensor):
        return checked_indices(selection, n, "inducing")
    check_count(num_inducing, n, "num_inducing")
    generator = default_generator(generator)
    features = _float_features(problem.x)
    if selection == "auto":
        selection = "kmeans" if features is not None else "random"
    if selection == "random":
        return random_points(n, num_inducing, generator)
    if selection == "kmeans":
        if features is None:
            raise ValueError(
                "selection='kmeans' needs floating-point inputs; these have none (token ids?): use "
                "selection='random' or 'pivoted_cholesky'"
            )
        if problem.sharding.distributed:
            from ntkgp.solvers.inducing.sharded_kmeans import sharded_kmeans_points  # it imports this module

            return sharded_kmeans_points(features, num_inducing, generator, problem.sharding)
        return kmeans_points(features, num_inducing, generator)
    if selection == "pivoted_cholesky":
        return pivoted_cholesky_points(
            problem,
            num_inducing,
            problem.layout.initial_precision.to(problem.network.device),
            pool_size=pool_size,
            generator=generator,
        )
    raise ValueError(
        f"selection must be 'auto', 'kmeans', 'pivoted_cholesky', 'random' or an index tensor, got {selection!r}"
    )
