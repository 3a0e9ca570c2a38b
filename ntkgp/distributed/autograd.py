r"""The autograd-aware collectives of :class:`~ntkgp.distributed.Sharding`.

Each rank holds two kinds of tensors: *replicated* ones, equal on every rank (the hyperparameters
:math:`\delta` and :math:`\sigma^2`, ``P``-vectors, ``P x P`` and ``MC x MC`` caches, the evidence),
and *local* ones, the rank's rows of a quantity over the data (noise diagonal, residual, CG
iterates). Gradients follow the same split: after ``backward()``, a replicated leaf holds the full
gradient on every rank, a local tensor its own rows' partial derivatives. Four conjugate maps keep
that true (Megatron-LM's ``f`` / ``g`` pair, plus two for ntkgp's needs):

* :class:`SumOverRanks` (local partial sums -> replicated): all-reduce forward, identity backward;
* :class:`EnterLocal` (replicated -> used in a rank-local computation): identity forward,
  all-reduce backward;
* :class:`Agree` (a local tensor that holds a replicated value, e.g. the first row of a noise
  diagonal constant over the data -> replicated): identity forward, backward divided by the
  number of ranks;
* :class:`GatherRows` (every rank's rows -> replicated concatenation): all-gather forward,
  backward takes the rank's own slice.

:class:`FromReplicated` is :class:`EnterLocal` applied to the parameters of a function that
builds a local tensor (the likelihood's noise on the rank's rows): the parameters' gradients are
all-reduced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Agree", "EnterLocal", "FromReplicated", "GatherRows", "SumOverRanks"]


class SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (the sum is replicated, so is its gradient)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        return grad, None


class EnterLocal(torch.autograd.Function):
    """Identity forward; all-reduce backward (every rank's local use adds to the gradient)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


class Agree(torch.autograd.Function):
    """Identity forward on a value every rank holds; backward divided by the number of ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, world_size: int) -> Tensor:
        ctx.world_size = world_size
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        return grad / ctx.world_size, None


class GatherRows(torch.autograd.Function):
    """Every rank's rows (dim 0) in rank order forward; backward keeps the rank's own rows."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, counts: Sequence[int], rank: int, group: Any) -> Tensor:
        ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
        width = max(counts)
        padded = tensor.new_zeros(width, *tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        return grad[ctx.start : ctx.stop], None, None, None


class FromReplicated(torch.autograd.Function):
    """``build()`` (a local tensor made from replicated ``params``), with the params' gradients all-reduced."""

    @staticmethod
    def forward(ctx: Any, build: Callable[[], Tensor], group: Any, *params: Tensor) -> Tensor:
        with torch.enable_grad():
            out = build()
        ctx.out, ctx.params, ctx.group = out, params, group
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        wanted = [i for i, p in enumerate(ctx.params) if p.requires_grad]
        grads: list[Tensor | None] = [None] * len(ctx.params)
        if wanted and ctx.out.requires_grad:
            found = torch.autograd.grad(
                ctx.out, [ctx.params[i] for i in wanted], grad, retain_graph=True, allow_unused=True
            )
            for i, g in zip(wanted, found):
                total = torch.zeros_like(ctx.params[i]) if g is None else g.contiguous().clone()
                dist.all_reduce(total, group=ctx.group)
                grads[i] = total
        return (None, None, *grads)
