r"""The same GP over several processes: ``torch.distributed`` collectives for sharded training data.

Each process (rank) of a process group passes its own shard of the training data, as in
``DistributedDataParallel``; :class:`Sharding` records the split and gives the collectives that
turn the sums over data of the products layer and the solvers into sums over all ranks, with
gradients that flow through them (:mod:`ntkgp.distributed.autograd`). Every rank then holds the
same evidence, gradients and posterior; test inputs may be sharded too, each rank predicting its
own points with no communication. See ``docs/distributed.md``.

This package uses ``torch`` alone: it sits below every other ntkgp package.
"""

from ntkgp.distributed.sharding import ONE_PROCESS, Sharding, shard_range

__all__ = ["ONE_PROCESS", "Sharding", "shard_range"]
