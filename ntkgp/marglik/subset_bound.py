r"""A lower bound on the log evidence from NTKs of data subsets (Immer et al., ICML 2023).

The Laplace-form log evidence of the linearized network at :math:`\hat\theta` is

.. math::
    \mathcal L = \log p(y \mid \hat f) - \tfrac12 \hat\theta^\top P_0 \hat\theta
                 - \tfrac12 \log\lvert I + B^\top K B\rvert ,

with :math:`\Lambda = BB^\top` the per-point GGN blocks (for a Gaussian likelihood
:math:`B = S^{-1/2}`, and at a MAP :math:`\mathcal L` equals the exact GP evidence). For a
partition of the data into subsets :math:`s`, Fischer's inequality for the positive-definite
:math:`I + B^\top K B` gives
:math:`\log\lvert I + B^\top K B\rvert \le \sum_s \log\lvert I + B_s^\top K_{ss} B_s\rvert`, so

.. math::
    \mathcal L \;\ge\; \mathcal L_{\text{sub}} = \log p(y \mid \hat f) - \tfrac12 \hat\theta^\top P_0 \hat\theta
        - \tfrac12 \sum_s \log\lvert I + B_s^\top K_{ss} B_s\rvert ,

which needs only the ``(B C) x (B C)`` kernels of the subsets: cost linear in N. It is a sum
over subsets, so one subset ``s`` drawn uniformly, with its term scaled by the number of subsets,
gives an unbiased estimate of :math:`\mathcal L_{\text{sub}}` and of its gradients with respect
to the prior precisions (and the noise): :meth:`SubsetEvidenceBound.minibatch`.

**Over a process group** (the model's, or ``process_group``): each rank partitions its own shard,
the partition of all the data being the union; the data terms and the subset terms are summed
over ranks (all-reduce), so the bound, and its gradients, are the one-process bound's for that
partition, on every rank. In :meth:`~SubsetEvidenceBound.minibatch` each rank draws one of its
own subsets: the sum over ranks of their scaled terms is again unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ntkgp._random import default_generator, draw_device
from ntkgp.distributed import Sharding
from ntkgp.likelihoods.base import LaplaceLikelihood
from ntkgp.linalg.cholesky import cholesky_logdet
from ntkgp.linalg.hessian_root import sandwich
from ntkgp.ntk import gram as ntk_gram

if TYPE_CHECKING:
    from ntkgp.models.linearized_gp import LinearizedGP

__all__ = ["SubsetEvidenceBound"]


class SubsetEvidenceBound:
    """The subset-NTK lower bound on the log evidence of a :class:`~ntkgp.models.LinearizedGP`.

    Parameters
    ----------
    model:
        The LinearizedGP (its network, prior groups, likelihood and training data are used; its
        hyperparameters are read at each evaluation, so gradients reach them).
    subsets:
        A partition of ``range(N)`` (e.g. :func:`random_partition` or :func:`class_partition`).
        The per-subset, per-group Gram matrices are computed once, on first use. With a process
        group: a partition of this rank's shard, ``range(model.num_data)``.
    process_group:
        ``None``: the model's (one process for a GP built without one). A ``torch.distributed``
        group sums the bound over its ranks, each with the model of its own data (a GP built on
        the rank's minibatch in a DDP loop, say); a sharded model's own group is used if given.
        Evaluations and their backward passes are then collective.
    """

    def __init__(self, model: LinearizedGP, subsets: Sequence[Tensor], *, process_group: Any = None) -> None:
        covered = torch.cat([torch.as_tensor(s).reshape(-1) for s in subsets]).sort().values
        if not torch.equal(covered.cpu(), torch.arange(model.num_data)):
            raise ValueError("subsets must partition range(N): every training point exactly once")
        self.model = model
        if model.sharding.distributed:
            if process_group is not None and process_group is not model.sharding.group:
                raise ValueError("process_group differs from the group the model is sharded over")
            #: how the data are split over processes (the model's, or ``process_group``'s)
            self.sharding = model.sharding
        else:
            self.sharding = Sharding.create(process_group, model.num_data, model.network.device)
        #: draws :meth:`minibatch` subsets when no generator is given (seeded with 0; never the global RNG)
        self.generator = default_generator(None)
        self.subsets = [torch.as_tensor(s).reshape(-1).to(model.network.device) for s in subsets]
        network, x = model.network, model.train_x
        #: per subset, per-group Grams ``(G, b*C, b*C)``, float64; each is computed on first use, so
        #: one-subset estimates (:meth:`minibatch`) pay only for the subsets they draw
        self._grams: list[Tensor | None] = [None] * len(self.subsets)
        f_hat = network.forward(x).to(torch.float64)
        self.laplace = isinstance(model.likelihood, LaplaceLikelihood)
        if self.laplace:
            root = model.likelihood.hessian_root(f_hat)  # shape: (N, C, C)
            self.roots = [root[s] for s in self.subsets]
            #: :math:`\log p(y \mid \hat f)`, summed over ranks
            self.map_log_likelihood = self.sharding.sum(model.likelihood.log_likelihood(f_hat, model.train_targets))
        else:
            #: training residuals of the network, ``y - f(X; theta_hat)``, ``(N*C,)``
            self.residual = (model.train_targets.to(torch.float64).reshape(x.num, -1) - f_hat).reshape(-1)

    def gram(self, index: int) -> Tensor:
        """Per-group Grams of subset ``index``, ``(G, b*C, b*C)``, float64 (computed once)."""
        gram = self._grams[index]
        if gram is None:
            gram = self._grams[index] = ntk_gram(self.model.ntk, self.model.train_x[self.subsets[index]])
        return gram

    @property
    def grams(self) -> list[Tensor]:
        """All subsets' per-group Grams (computing those not yet computed)."""
        return [self.gram(i) for i in range(self.num_subsets)]

    @property
    def num_subsets(self) -> int:
        return len(self.subsets)

    def _inputs(self) -> tuple[Tensor, Tensor | None]:
        """This evaluation's :math:`\\delta` for the rank-local subset terms and the noise on the rank's points
        (``None`` for Laplace likelihoods). Made once per evaluation, whatever the number of subsets, so that
        every rank's backward pass has the same collectives."""
        model = self.model
        delta = self.sharding.enter(model.prior_precision.to(torch.float64))
        if self.laplace:
            return delta, None
        if model.sharding.distributed or not self.sharding.distributed:
            return delta, model.noise_diagonal()
        return delta, self.sharding.from_replicated(model.noise_diagonal, list(model.likelihood.parameters()))

    def _data_and_prior_terms(self, noise: Tensor | None) -> Tensor:
        model = self.model
        theta = model.network.flat_params.to(torch.float64)
        prior = model.layout.expand(model.prior_precision.to(torch.float64))
        scatter = (prior * theta.square()).sum()
        if noise is None:
            return self.map_log_likelihood - 0.5 * scatter
        log_lik = self.sharding.sum(-0.5 * (self.residual.square() / noise + torch.log(2 * math.pi * noise)).sum())
        return log_lik - 0.5 * scatter

    def _subset_log_det(self, index: int, delta: Tensor, noise: Tensor | None) -> Tensor:
        r""":math:`\log|I + B_s^\top K_{ss} B_s|` of subset ``index``, differentiable."""
        model = self.model
        kernel = model.layout.weighted(delta.reciprocal(), self.gram(index))
        rows = self.subsets[index]
        if noise is None:
            matrix = sandwich(self.roots[index], kernel)  # B^T K B
        else:
            inv_sd = noise.reshape(-1, model.num_outputs)[rows].reshape(-1).rsqrt()
            matrix = inv_sd.unsqueeze(-1) * kernel * inv_sd.unsqueeze(-2)
        matrix = matrix + torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return cholesky_logdet(matrix, what="I + B_s^T K_ss B_s")

    def __call__(self) -> Tensor:
        """The bound :math:`\\mathcal L_{\\text{sub}}` over all subsets (of every rank), differentiable."""
        delta, noise = self._inputs()
        log_det = sum(self._subset_log_det(i, delta, noise) for i in range(self.num_subsets))
        assert isinstance(log_det, Tensor)  # at least one subset
        return self._data_and_prior_terms(noise) - 0.5 * self.sharding.sum(log_det)

    def minibatch(self, index: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """An unbiased estimate of the bound from one subset (drawn uniformly if ``index`` is None).

        Its expectation over the subset, and that of its gradients, equals :meth:`__call__`. Over a
        process group each rank draws (or is given) one of its own subsets.
        """
        if index is None:
            generator = self.generator if generator is None else generator
            index = int(torch.randint(self.num_subsets, (1,), generator=generator, device=draw_device(generator)))
        delta, noise = self._inputs()
        scaled = self.num_subsets * self._subset_log_det(index, delta, noise)
        return self._data_and_prior_terms(noise) - 0.5 * self.sharding.sum(scaled)

    def laplace_evidence(self) -> Tensor:
        r"""The un-partitioned :math:`\mathcal L` (one subset holding all data), for comparison (one process)."""
        if self.sharding.distributed:
            raise NotImplementedError("the un-partitioned evidence needs all N points on one process")
        return SubsetEvidenceBound(self.model, [torch.arange(self.model.num_data)])()
