r"""Batched test inputs ``(*batch, q, ...)`` for :class:`~ntkgp.LinearizedGP`: one joint distribution per group.

GPyTorch models called on inputs with extra leading dimensions return a batch of joint
distributions over the last ``q`` points (BoTorch's ``b x q x d`` acquisition inputs). A leaf of
the test inputs is batched when its shape is ``(*batch, q, *example)``, with ``example`` the
per-example shape of the same leaf of the training inputs (or, for a single tensor, its flattened
size ``(*batch, q, D)``); all leaves' leading shapes are broadcast together. The distribution has
mean ``(*batch, q)`` (``C = 1``) or ``(*batch, q, C)`` and covariance ``(*batch, qC, qC)`` from
:func:`~ntkgp.posteriors.batched.grouped_covariance`, differentiable in the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from ntkgp.network.inputs import InputLike, Inputs
from ntkgp.posteriors.batched import grouped_posterior, grouped_prior_covariance

if TYPE_CHECKING:
    from ntkgp.models.linearized_gp import LinearizedGP

__all__ = ["BatchedInputs", "batched_distribution", "split_batch"]


class BatchedInputs:
    """Test inputs with a batch shape: ``inputs`` holds ``prod(batch) * q`` examples, group-major."""

    def __init__(self, inputs: Inputs, batch_shape: torch.Size, q: int) -> None:
        self.inputs, self.batch_shape, self.q = inputs, batch_shape, q

    @property
    def groups(self) -> int:
        return math.prod(self.batch_shape)


def _leading(t: Tensor, example: torch.Size) -> torch.Size | None:
    """The leading shape of ``t`` before one example of shape ``example`` (or its flattened size)."""
    k = len(example)
    if t.dim() >= k + 1 and tuple(t.shape[t.dim() - k :]) == tuple(example):
        return t.shape[: t.dim() - k]
    if k > 1 and t.dim() >= 2 and t.shape[-1] == example.numel():
        return t.shape[:-1]
    return None


def split_batch(train_x: Inputs, x: InputLike) -> BatchedInputs | None:
    """``x`` as :class:`BatchedInputs` when it has batch dimensions (see the module docstring), else ``None``."""
    if isinstance(x, Inputs):
        return None
    leaves = _tensor_leaves(x)
    examples = {key: t.shape[1:] for key, t in train_x.tensors()}
    leads = {}
    for key, t in leaves.items():
        if key not in examples:
            return None  # a structural mismatch: reported by the model's own input check
        lead = _leading(t, examples[key])
        if lead is None:
            return None
        leads[key] = lead
    if not leads or all(len(lead) <= 1 for lead in leads.values()):
        return None
    try:
        shape = torch.broadcast_shapes(*leads.values())
    except RuntimeError as err:
        raise ValueError(f"the batch shapes of the inputs' tensors do not broadcast: {dict(leads)}") from err
    n = math.prod(shape)
    flat = {key: t.expand(*shape, *examples[key]).reshape(n, *examples[key]) for key, t in leaves.items()}
    if isinstance(x, Tensor):
        return BatchedInputs(Inputs.wrap(flat[None]), shape[:-1], shape[-1])
    if isinstance(x, Mapping):
        data: Any = {k: flat.get(k, v) for k, v in x.items()}
    else:
        data = tuple(flat.get(i, v) for i, v in enumerate(x))
    return BatchedInputs(Inputs.wrap(data), shape[:-1], shape[-1])


def _tensor_leaves(x: Any) -> dict[Any, Tensor]:
    """The tensor leaves of a tensor, tuple/list or dict input, keyed as :meth:`Inputs.tensors` keys them."""
    if isinstance(x, Tensor):
        return {None: x}
    if isinstance(x, Mapping):
        return {k: v for k, v in x.items() if isinstance(v, Tensor)}
    if isinstance(x, (tuple, list)):
        return {i: v for i, v in enumerate(x) if isinstance(v, Tensor)}
    return {}


def batched_distribution(model: LinearizedGP, x: BatchedInputs, *, prior: bool) -> MultivariateNormal:
    """The batch of joint distributions over the ``q`` points of each group (posterior, or prior if ``prior``)."""
    C, q = model.num_outputs, x.q
    inputs = model.inputs(x.inputs)
    if prior:
        mean = model.mean_module(inputs).reshape(inputs.num, C)
        cov = grouped_prior_covariance(model.ntk, model.prior_precision, inputs, q)
    else:
        mean, cov = grouped_posterior(model.posterior(), inputs, q)
    mean = mean.reshape(*x.batch_shape, q, C)
    # lazily: a dense tensor would be factored at once (and fail where jitter is needed, as at repeated points)
    cov = DenseLinearOperator(cov.reshape(*x.batch_shape, q * C, q * C))
    if C == 1:
        return MultivariateNormal(mean[..., 0], cov)
    return MultitaskMultivariateNormal(mean, cov, interleaved=True)
