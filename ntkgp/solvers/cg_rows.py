r"""The CG route's pieces that depend on where the rows of ``M = N C``-vectors live (one process, or sharded).

:class:`CGRows` is mixed into :class:`~ntkgp.solvers.CGSolver`. With a process group
(:mod:`ntkgp.distributed`) each rank holds the rows of its training points of every iterate,
probe and basis vector; products with the kernel all-reduce the pulled-back ``P``-vectors, inner
products are all-reduced, and the preconditioner, probes and Lanczos basis come from
:mod:`ntkgp.linalg.sharded`. For one process each method is the plain one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ntkgp.linalg.lanczos_decomposition import lanczos_decomposition
from ntkgp.linalg.preconditioner import LowRankPlusDiagonal, pivoted_cholesky
from ntkgp.linalg.sharded import (
    ShardedLowRankPlusDiagonal,
    sharded_krylov_basis,
    sharded_pivoted_cholesky,
    sharded_rademacher,
)
from ntkgp.linalg.slq import rademacher
from ntkgp.ntk import kernel_matmul_columns
from ntkgp.solvers.base import SolverBase

__all__ = ["CGRows"]


class CGRows(SolverBase):
    """Row-layout-dependent steps of the CG route (see the module docstring)."""

    @property
    def reduce(self) -> Callable[[Tensor], Tensor] | None:
        """Sums over ranks (in place) of pulled-back ``P``-vectors and inner products; ``None`` for one process."""
        return self.sharding.sum_ if self.sharding.distributed else None

    @property
    def row_offset(self) -> int:
        """The global index of this rank's first row (0 for one process)."""
        return self.sharding.offset * self.problem.num_outputs if self.sharding.distributed else 0

    def sharded_pivot_columns(self, delta: Tensor, index: Tensor) -> Tensor:
        """This rank's rows of :math:`K[:, \\text{index}]` (global rows ``index``): the pivot points' owners pull
        back, the pulled vectors are summed over ranks, every rank pushes forward on its shard."""
        C, x = self.problem.num_outputs, self.problem.x
        local = index - self.row_offset
        mine = ((local >= 0) & (local < self.size)).nonzero().reshape(-1)
        points, inverse = torch.unique(torch.div(local[mine], C, rounding_mode="floor"), return_inverse=True)
        select = torch.zeros(max(1, points.numel()) * C, index.numel(), dtype=self.network.dtype, device=index.device)
        select[inverse * C + local[mine] % C, mine] = 1
        at = x[points] if points.numel() else x[:1]  # a rank with no pivot pulls back zeros
        with torch.no_grad():
            return kernel_matmul_columns(self.ntk, x, at, delta.detach().reciprocal(), select, reduce=self.reduce)

    def pivoted_factor(
        self, diagonal: Tensor, columns: Callable[[Tensor], Tensor], rank: int, trace_tol: float
    ) -> Tensor:
        """The partial pivoted Cholesky factor of the kernel (this rank's rows)."""
        if self.sharding.distributed:
            return sharded_pivoted_cholesky(
                diagonal, columns, rank, self.sharding, self.row_offset, trace_tol=trace_tol
            )
        return pivoted_cholesky(diagonal, columns, rank, trace_tol=trace_tol)

    def low_rank_plus_diagonal(self, factor: Tensor, noise: Tensor) -> LowRankPlusDiagonal:
        """:math:`P = LL^\\top + S` from the factor's and the noise's rows."""
        if self.sharding.distributed:
            return ShardedLowRankPlusDiagonal(factor, noise, self.sharding)
        return LowRankPlusDiagonal(factor, noise)

    def probes(self, kind: str, count: int, seed: int) -> Tensor:
        """``count`` Rademacher probes from a generator seeded with ``seed``, or the unit vectors (``kind="basis"``):
        this rank's rows of what one process would draw."""
        device, total = self.network.device, self.problem.total_size
        if kind == "basis":
            return torch.eye(total, dtype=torch.float64, device=device)[self.row_offset : self.row_offset + self.size]
        generator = torch.Generator().manual_seed(seed)
        if not self.sharding.distributed:
            return rademacher(self.size, count, generator, device)
        return sharded_rademacher(self.row_offset, self.size, total, count, generator, device)

    def lanczos(
        self, operator: Callable[[Tensor], Tensor], start: Tensor, steps: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """``steps`` Lanczos steps on ``operator`` from ``start``: this rank's rows of :math:`Q`, and :math:`T`."""
        progress = self.network.progress
        if self.sharding.distributed:
            return sharded_krylov_basis(
                operator,
                start,
                steps,
                self.sharding,
                self.row_offset,
                generator=generator,
                progress=progress,
                desc="Lanczos (LOVE)",
            )
        return lanczos_decomposition(operator, start, steps, generator=generator, progress=progress)
