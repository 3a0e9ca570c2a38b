r"""A :class:`~ntkgp.LinearizedGP` over a process group: the checks at construction and the noise of a shard.

With ``process_group`` each rank passes its shard of the training data; the network, the prior
precisions and the likelihood's parameters must be the same on every rank (as
``DistributedDataParallel`` makes the network's weights by broadcasting them). :func:`make_sharding`
records the split (:class:`~ntkgp.distributed.Sharding`) and checks that, so that a rank started
with other weights fails loudly instead of computing another GP.
"""

from __future__ import annotations

from typing import Any

import torch
from gpytorch.likelihoods import Likelihood
from torch import Tensor

from ntkgp.distributed import Sharding
from ntkgp.network.functional import FunctionalNetwork
from ntkgp.ntk.layout import PriorLayout

__all__ = ["SHARDED_TRAIN_CALL", "make_sharding", "noise_of_shard"]

#: why a sharded GP refuses GPyTorch's train-mode call
SHARDED_TRAIN_CALL = (
    "a LinearizedGP sharded over a process group has no train-mode distribution for GPyTorch's "
    "ExactMarginalLogLikelihood (its normalizers are one process's); maximize model.log_evidence(), the same "
    "on every rank, and divide by the N of all ranks if you want it per point"
)


def make_sharding(
    process_group: Any, num_local: int, network: FunctionalNetwork, layout: PriorLayout, likelihood: Likelihood
) -> Sharding:
    """The split of ``num_local`` points on this rank over ``process_group`` (``None``: one process), after
    checking that the network's weights, the initial prior precisions and the likelihood's parameters are
    equal on every rank (collective)."""
    sharding = Sharding.create(process_group, num_local, network.device)
    if sharding.distributed:
        sharding.check_replicated(network.flat_params, "the network's weights")
        sharding.check_replicated(layout.initial_precision.to(network.device), "the prior precisions")
        params = [p.detach().reshape(-1).to(torch.float64) for p in likelihood.parameters()]
        if params:
            sharding.check_replicated(torch.cat(params), "the likelihood's parameters")
    return sharding


def noise_of_shard(sharding: Sharding, likelihood: Likelihood, build: Any) -> Tensor:
    """``build()``, the likelihood's noise on this rank's rows, with its parameters' gradients summed over
    ranks (:meth:`~ntkgp.distributed.Sharding.from_replicated`)."""
    return sharding.from_replicated(build, list(likelihood.parameters()))
