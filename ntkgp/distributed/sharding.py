r"""How the training data are split over the processes of a ``torch.distributed`` group.

A :class:`Sharding` knows the group, this process's rank in it and how many training points every
rank holds (``counts``; rank ``r`` holds the global points ``offset_r .. offset_r + counts[r] - 1``,
the ranks' shards one after the other). It gives the collectives the solvers use, each a no-op
for one process (:data:`ONE_PROCESS`):

* :meth:`Sharding.sum` (rank-local partial sums -> replicated), :meth:`Sharding.enter` (replicated ->
  used in a rank-local computation), :meth:`Sharding.agree`, :meth:`Sharding.gather_rows` and
  :meth:`Sharding.from_replicated`: differentiable, with the gradient conventions of
  :mod:`ntkgp.distributed.autograd`;
* :meth:`Sharding.sum_` (in place), :meth:`Sharding.max`, :meth:`Sharding.any`,
  :meth:`Sharding.broadcast_`, :meth:`Sharding.check_replicated`: without gradients.

Every method that communicates is *collective*: every rank of the group must call it, in the
same order, with tensors of the same shape (``gather_rows`` excepted: its row counts may differ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ntkgp.distributed.autograd import Agree, EnterLocal, FromReplicated, GatherRows, SumOverRanks

__all__ = ["ONE_PROCESS", "Sharding", "shard_range"]


def shard_range(num_data: int, rank: int, world_size: int) -> range:
    """The contiguous, nearly even share of ``range(num_data)`` that rank ``rank`` of ``world_size`` holds.

    The first ``num_data % world_size`` ranks hold one point more (as ``torch.tensor_split``).
    """
    base, extra = divmod(num_data, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class Sharding:
    """The training data's split over a process group (see the module docstring).

    Build it with :meth:`create` (collective: it gathers every rank's point count); the
    constructor without arguments is one process, :data:`ONE_PROCESS`.

    Parameters
    ----------
    group:
        The process group, or ``None`` for one process.
    counts:
        Training points per rank, in rank order.
    rank:
        This process's rank in ``group``.
    """

    def __init__(self, group: Any = None, counts: Sequence[int] = (), rank: int = 0) -> None:
        self.group = group
        self.counts = tuple(int(c) for c in counts)
        self.rank = rank

    @classmethod
    def create(cls, group: Any, num_local: int, device: torch.device | str = "cpu") -> Sharding:
        """The sharding of ``num_local`` points on this rank over ``group`` (``None``: one process).

        Collective. Raises a ``RuntimeError`` when ``torch.distributed`` is not initialized and a
        ``ValueError`` when some rank holds no point.
        """
        if group is None:
            return ONE_PROCESS
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group (torchrun does the rendezvous) first"
            )
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        mine = torch.tensor([num_local], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        counts = [int(p) for p in parts]
        if min(counts) < 1:
            raise ValueError(f"every rank must hold at least one training point; the shards hold {counts}")
        return cls(group, counts, rank)

    # ------------------------------------------------------------------ layout
    @property
    def distributed(self) -> bool:
        """Whether there is a process group (``False`` for one process)."""
        return self.group is not None

    @property
    def world_size(self) -> int:
        return len(self.counts) if self.distributed else 1

    @property
    def offset(self) -> int:
        """The global index of this rank's first point."""
        return sum(self.counts[: self.rank])

    @property
    def total(self) -> int:
        """N, the points over all ranks."""
        return sum(self.counts)

    def owned(self, indices: Tensor) -> Tensor:
        """The positions in ``indices`` (global point indices, ``(m,)``) of the points this rank holds."""
        start = self.offset
        return ((indices >= start) & (indices < start + self.counts[self.rank])).nonzero().reshape(-1)

    # ------------------------------------------------------------------ differentiable collectives
    def sum(self, tensor: Tensor) -> Tensor:
        """The sum over ranks of a rank-local partial sum: replicated; identity backward."""
        return SumOverRanks.apply(tensor, self.group) if self.distributed else tensor

    def enter(self, tensor: Tensor) -> Tensor:
        """A replicated tensor entering a rank-local computation: gradients all-reduced."""
        return EnterLocal.apply(tensor, self.group) if self.distributed else tensor

    def agree(self, tensor: Tensor) -> Tensor:
        """A rank-local tensor that holds the same value on every rank, used as replicated."""
        return Agree.apply(tensor, self.world_size) if self.distributed else tensor

    def gather_rows(self, tensor: Tensor, counts: Sequence[int] | None = None) -> Tensor:
        """Every rank's rows of ``tensor`` (dim 0), in rank order, on every rank; ``counts`` are the
        row counts per rank when known (else gathered first)."""
        if not self.distributed:
            return tensor
        if counts is None:
            counts = self.gather_counts(tensor.shape[0], tensor.device)
        return GatherRows.apply(tensor, tuple(counts), self.rank, self.group)

    def from_replicated(self, build: Callable[[], Tensor], params: Sequence[Tensor]) -> Tensor:
        """``build()``, a rank-local tensor made from the replicated ``params``: their gradients all-reduced."""
        if not self.distributed or not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return build()
        return FromReplicated.apply(build, self.group, *params)

    # ------------------------------------------------------------------ collectives without gradients
    def sum_(self, tensor: Tensor) -> Tensor:
        """All-reduce (sum) ``tensor`` in place, without gradients, and return it."""
        if self.distributed:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        """The elementwise maximum over ranks (a new tensor)."""
        out = tensor.detach().clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether ``flag`` holds on some rank."""
        if not self.distributed:
            return flag
        return bool(self.max(torch.tensor([float(flag)], device=device)) > 0)

    def gather_counts(self, count: int, device: torch.device | str = "cpu") -> list[int]:
        """``count`` of every rank, in rank order."""
        if not self.distributed:
            return [count]
        mine = torch.tensor([count], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in self.counts]
        dist.all_gather(parts, mine, group=self.group)
        return [int(p) for p in parts]

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``tensor`` in place with rank ``src``'s (a rank in the group) and return it."""
        if self.distributed:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, src), group=self.group)
        return tensor

    def check_replicated(self, tensor: Tensor, what: str) -> None:
        """Raise a ``ValueError`` naming ``what`` unless ``tensor`` is equal on every rank (exactly)."""
        if not self.distributed:
            return
        flat = tensor.detach().reshape(-1).to(torch.float64)
        both = torch.cat([flat, -flat])
        spread = self.max(both)
        if not torch.equal(spread[: flat.numel()], -spread[flat.numel() :]):
            raise ValueError(
                f"{what} differ between the ranks; every rank must pass the same (broadcast them from rank 0, "
                "as DistributedDataParallel does for the network's weights)"
            )

    def __repr__(self) -> str:
        if not self.distributed:
            return "Sharding(one process)"
        return f"Sharding(rank {self.rank} of {self.world_size}, points per rank {list(self.counts)})"


#: one process: every collective is a no-op
ONE_PROCESS = Sharding()
