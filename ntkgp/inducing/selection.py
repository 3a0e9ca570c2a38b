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

import torch
from torch import Tensor

from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import ntk_gram
from ntkgp.parameter_groups import ParameterGroups

__all__ = ["kmeans_points", "pivoted_cholesky_points", "random_points", "select_inducing_points"]

#: default candidate pool of the pivoted-Cholesky search, in kernel rows (points x outputs)
DEFAULT_POOL_SIZE = 4000


def random_points(num_data: int, num_inducing: int, generator: torch.Generator | None = None) -> Tensor:
    """``num_inducing`` distinct indices in ``range(num_data)``, sorted."""
    perm = torch.randperm(num_data, generator=generator)
    return perm[:num_inducing].sort().values


def kmeans_points(
    x: Tensor, num_inducing: int, generator: torch.Generator | None = None, iterations: int = 25
) -> Tensor:
    """Indices of the training points nearest to k-means centres of ``x`` ``(N, D)``, sorted."""
    x = x.reshape(x.shape[0], -1).to(torch.float64).cpu()
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator)
    centres = x[first]
    closest = (x - centres).square().sum(-1)
    for _ in range(1, num_inducing):  # k-means++: sample proportional to the squared distance
        total = closest.sum()
        probs = closest / total if total > 0 else torch.full_like(closest, 1.0 / n)
        new = x[torch.multinomial(probs, 1, generator=generator)]
        centres = torch.cat([centres, new])
        closest = torch.minimum(closest, (x - new).square().sum(-1))
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(-1)
        counts = torch.bincount(assign, minlength=num_inducing).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        if torch.allclose(moved, centres):
            break
        centres = moved
    distance = torch.cdist(centres, x)
    chosen: list[int] = []
    taken = torch.zeros(n, dtype=torch.bool)
    for row in distance:  # nearest unused training point to each centre
        row = row.masked_fill(taken, float("inf"))
        i = int(row.argmin())
        taken[i] = True
        chosen.append(i)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def pivoted_cholesky_points(
    network: FunctionalNetwork,
    groups: ParameterGroups,
    x: Tensor,
    num_inducing: int,
    delta: Tensor,
    *,
    budget: int,
    pool_size: int = DEFAULT_POOL_SIZE,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-10,
) -> Tensor:
    r"""Greedy point-block pivoted Cholesky of the NTK :math:`K(\delta)` (see the module docstring).

    Stops early, returning fewer points, once the largest residual trace falls below
    ``tolerance`` times the largest prior trace (the NTK's rank on the pool is exhausted).
    Cost: the pool's Gram ``(n C)^2`` and ``O(n C \cdot (M C)^2)`` for the factorization.
    """
    n, C = x.shape[0], network.num_outputs
    pool_size = max(pool_size // C, 2 * num_inducing)  # pool_size counts kernel rows (points x C)
    pool = torch.arange(n) if n <= pool_size else random_points(n, pool_size, generator)
    grams = ntk_gram(network, groups, x[pool.to(x.device)], budget=budget)
    gram = torch.einsum("g,gij->ij", delta.to(grams.dtype).reciprocal(), grams)  # shape: (n_pool C, n_pool C)
    del grams
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
    return pool[torch.tensor(chosen, dtype=torch.long)].sort().values


def select_inducing_points(
    selection: str | Tensor,
    network: FunctionalNetwork,
    groups: ParameterGroups,
    x: Tensor,
    num_inducing: int,
    *,
    budget: int,
    pool_size: int = DEFAULT_POOL_SIZE,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the inducing points by rule name (``"pivoted_cholesky"``, ``"kmeans"``,
    ``"random"``) or given directly as an index tensor."""
    n = x.shape[0]
    if isinstance(selection, Tensor):
        idx = selection.to(torch.long).cpu().reshape(-1)
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= n or idx.unique().numel() != idx.numel():
            raise ValueError(f"inducing indices must be distinct and in [0, {n}); got {idx.numel()} indices")
        return idx.sort().values
    if not 1 <= num_inducing <= n:
        raise ValueError(f"num_inducing must be in [1, N={n}], got {num_inducing}")
    if selection == "random":
        return random_points(n, num_inducing, generator)
    if selection == "kmeans":
        return kmeans_points(x, num_inducing, generator)
    if selection == "pivoted_cholesky":
        return pivoted_cholesky_points(network, groups, x, num_inducing, groups.initial_precision.to(x.device),
                                       budget=budget, pool_size=pool_size, generator=generator)
    raise ValueError(f"selection must be 'pivoted_cholesky', 'kmeans', 'random' or an index tensor, got {selection!r}")
