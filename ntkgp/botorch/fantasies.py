r"""Batches of fantasy observations: exact Gaussian conditioning of the GP's posterior, per batch.

BoTorch's ``fantasize`` conditions a model on ``s`` sampled observation sets at inputs ``Z``
``(*zb, n', d)``, giving a model with batch shape ``(s, *zb)``. Each member is the GP on the
training data plus its own ``(Z_b, Y_b)``; with the network and the hyperparameters fixed it is
exactly the base posterior conditioned on those observations:

.. math::
    \mu'(x) = \mu(x) + \Sigma_{xZ}(\Sigma_{ZZ} + S_Z)^{-1}(y_Z - \mu(Z)),\qquad
    \Sigma'(x, x') = \Sigma(x, x') - \Sigma_{xZ}(\Sigma_{ZZ} + S_Z)^{-1}\Sigma_{Zx'},

with :math:`\mu, \Sigma` the base posterior and :math:`S_Z` the observation noise. :class:`Fantasies`
evaluates it from the base posterior's joint covariance over ``[x; Z]``, one ``(q + n')C`` square
block per input batch (:func:`~ntkgp.posteriors.batched.grouped_covariance`), differentiable in
``x``. The same conditioning serves :meth:`~ntkgp.botorch.LinearizedGPModel.condition_on_observations`
with batched observations; a single set is added to the GP itself (:meth:`~ntkgp.LinearizedGP.add_data`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from ntkgp.linalg.cholesky import cholesky
from ntkgp.models.batched import BatchedInputs, batched_distribution
from ntkgp.models.linearized_gp import LinearizedGP
from ntkgp.network.inputs import Inputs

__all__ = ["Fantasies"]


@dataclass(frozen=True)
class Fantasies:
    """Observations ``Y`` ``(*yb, n', C)`` at ``Z`` ``(*zb, n', d)`` with noise variances ``noise`` ``(*sb, n', C)``.

    The batch shape of the conditioned model is the broadcast of ``yb``, ``zb`` and ``sb``.
    """

    z: Tensor
    y: Tensor
    noise: Tensor

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(self.z.shape[:-2], self.y.shape[:-2], self.noise.shape[:-2])

    def merge(self, other: Fantasies) -> Fantasies:
        """Both sets of observations at once (batch shapes broadcast)."""
        batch = torch.broadcast_shapes(self.batch_shape, other.batch_shape)

        def cat(a: Tensor, b: Tensor) -> Tensor:
            return torch.cat([a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:])], -2)

        return Fantasies(cat(self.z, other.z), cat(self.y, other.y), cat(self.noise, other.noise))

    def distribution(self, model: LinearizedGP, x: Tensor) -> MultivariateNormal:
        """The conditioned joint distribution at ``x`` ``(*tb, q, d)``: batch ``broadcast(tb, batch_shape)``."""
        C, q, n = model.num_outputs, x.shape[-2], self.z.shape[-2]
        example = model.train_x.data.shape[1:]
        inputs_batch = torch.broadcast_shapes(x.shape[:-2], self.z.shape[:-2])
        joint_x = torch.cat(
            [x.expand(*inputs_batch, *x.shape[-2:]), self.z.to(x.dtype).expand(*inputs_batch, *self.z.shape[-2:])], -2
        )
        flat = Inputs.wrap(joint_x.reshape(-1, *example))
        joint = batched_distribution(model, BatchedInputs(flat, inputs_batch, q + n), prior=False)
        mean = joint.mean.reshape(*inputs_batch, q + n, C)
        cov = joint.covariance_matrix  # shape: (*inputs_batch, (q + n) C, (q + n) C), point-major
        qc = q * C
        s_xx, s_xz, s_zz = cov[..., :qc, :qc], cov[..., :qc, qc:], cov[..., qc:, qc:]
        noise = self.noise.to(cov.dtype).reshape(*self.noise.shape[:-2], n * C)
        factor = _cholesky(s_zz + torch.diag_embed(noise))  # shape: (*noise batch, n C, n C)
        solved = torch.linalg.solve_triangular(factor, s_xz.mT, upper=False)  # shape: (..., nC, qC)
        residual = self.y.to(cov.dtype).reshape(*self.y.shape[:-2], n * C) - mean[..., q:, :].reshape(
            *inputs_batch, n * C
        )
        white = torch.linalg.solve_triangular(factor, residual.unsqueeze(-1), upper=False)  # shape: (..., nC, 1)
        new_mean = mean[..., :q, :].reshape(*inputs_batch, qc) + (solved.mT @ white)[..., 0]
        new_cov = s_xx - solved.mT @ solved
        batch = torch.broadcast_shapes(x.shape[:-2], self.batch_shape)
        new_mean = new_mean.expand(*batch, qc).reshape(*batch, q, C)
        new_cov = DenseLinearOperator(new_cov.expand(*batch, qc, qc))  # lazily, as in ntkgp.models.batched
        if C == 1:
            return MultivariateNormal(new_mean[..., 0], new_cov)
        return MultitaskMultivariateNormal(new_mean, new_cov, interleaved=True)


def _cholesky(matrix: Tensor) -> Tensor:
    """Batched Cholesky; matrices that fail get ntkgp's reported jitter (:func:`~ntkgp.linalg.cholesky.cholesky`)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if not info.any():
        return factor
    flat = matrix.reshape(-1, *matrix.shape[-2:])
    factors = [cholesky(m, what="the fantasy points' covariance plus noise") for m in flat]
    return torch.stack(factors).reshape(matrix.shape)
