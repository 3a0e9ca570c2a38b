r"""The empirical NTK :math:`K(X_1, X_2) = \sum_g \delta_g^{-1} J_g(X_1) J_g(X_2)^\top` as a lazy
operator of shape ``(N1*C) x (N2*C)``."""

from __future__ import annotations

import torch
from linear_operator.operators import BatchRepeatLinearOperator, LinearOperator
from torch import Tensor

from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import ntk_gram, ntk_gram_diagonal
from ntkgp.memory import check_fits
from ntkgp.operators.jacobian_linear_operator import _as_columns, _from_columns
from ntkgp.parameter_groups import ParameterGroups

__all__ = ["NTKLinearOperator"]


class NTKLinearOperator(LinearOperator):
    r"""Lazy empirical NTK with per-group prior precisions.

    .. math::
        K(X_1, X_2) = J(X_1)\, P_0^{-1} J(X_2)^\top
                    = \sum_g \delta_g^{-1}\, J_g(X_1) J_g(X_2)^\top

    * ``K @ V`` is one batched vjp at :math:`X_2` (giving :math:`J^\top V`), a per-group
      scaling by :math:`1/\delta_g`, and one batched jvp at :math:`X_1`, chunked over data.
      No ``N x P`` Jacobian and no ``N x N`` matrix is formed.
    * ``diagonal()`` is the per-example squared Jacobian norm per group, scaled.
    * ``to_dense()`` is a chunked per-group Jacobian contraction (memory-checked).
    * Gradients with respect to ``prior_precision`` are exact:
      :math:`\partial (u^\top K v)/\partial\delta_g = -\delta_g^{-2}\,(J_g^\top u)\cdot(J_g^\top v)`.

    Parameters
    ----------
    x1, x2:
        Inputs ``(N1, D)``, ``(N2, D)``, flattened examples.
    prior_precision:
        :math:`\delta`, shape ``(G,)``, positive; may require grad.
    network, groups:
        The :class:`~ntkgp.functional.FunctionalNetwork` and its
        :class:`~ntkgp.parameter_groups.ParameterGroups`.
    budget:
        Bytes for Jacobian blocks in dense contractions.
    """

    def __init__(
        self,
        x1: Tensor,
        x2: Tensor,
        prior_precision: Tensor,
        *,
        network: FunctionalNetwork,
        groups: ParameterGroups,
        budget: int,
    ) -> None:
        super().__init__(x1, x2, prior_precision, network=network, groups=groups, budget=budget)
        self.x1, self.x2 = x1, x2
        self.prior_precision = prior_precision
        self.network, self.groups, self.budget = network, groups, budget

    # ------------------------------------------------------------------ shape
    @property
    def dtype(self) -> torch.dtype:
        return self.x1.dtype

    @property
    def device(self) -> torch.device:
        return self.x1.device

    def _size(self) -> torch.Size:
        C = self.network.num_outputs
        return torch.Size((self.x1.shape[0] * C, self.x2.shape[0] * C))

    def _transpose_nonbatch(self) -> NTKLinearOperator:
        return NTKLinearOperator(
            self.x2, self.x1, self.prior_precision,
            network=self.network, groups=self.groups, budget=self.budget,
        )

    @property
    def _is_symmetric(self) -> bool:
        return self.x1 is self.x2 or (self.x1.shape == self.x2.shape and torch.equal(self.x1, self.x2))

    # ------------------------------------------------------------- products
    def _scaled_pullback(self, x: Tensor, columns: Tensor, scale: Tensor | None) -> Tensor:
        # shape: columns (N*C, t) -> (t, P), optionally scaled per group
        cot = columns.T.reshape(columns.shape[-1], x.shape[0], self.network.num_outputs)
        pulled = self.network.vjp(x, cot)
        if scale is None:
            return pulled
        return self.groups.scale_tangents(pulled, scale, self.network.offsets)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, batch = _as_columns(rhs)
        inv_delta = self.prior_precision.detach().reciprocal()
        tangents = self._scaled_pullback(self.x2, cols, inv_delta)  # shape: (t, P)
        out = self.network.jvp(self.x1, tangents)  # shape: (t, N1, C)
        out = out.reshape(out.shape[0], -1).T.to(rhs.dtype)
        return _from_columns(out, batch, rhs.shape[-1])

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._transpose_nonbatch()._matmul(rhs)

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        if not self.prior_precision.requires_grad:
            return (None, None, None)
        left, _ = _as_columns(left_vecs)
        right, _ = _as_columns(right_vecs)
        u = self._scaled_pullback(self.x1, left, None).to(torch.float64)
        v = self._scaled_pullback(self.x2, right, None).to(torch.float64)
        products = (u * v).sum(0)  # shape: (P,)
        per_group = torch.zeros(self.groups.num_groups, dtype=torch.float64, device=products.device)
        for g, start, stop in self.groups.column_ranges(self.network.offsets):
            per_group[g] += products[start:stop].sum()
        delta = self.prior_precision.detach()
        grad = -per_group.to(delta.dtype) / delta.square()
        return (None, None, grad)

    # ---------------------------------------------------------------- dense
    def _group_weights(self) -> Tensor:
        return self.prior_precision.reciprocal()

    def _diagonal(self) -> Tensor:
        if not self._is_symmetric:
            raise RuntimeError("the diagonal of a cross-covariance NTK operator (x1 != x2) is undefined")
        per_group = ntk_gram_diagonal(self.network, self.groups, self.x1, budget=self.budget)
        weights = self._group_weights().to(torch.float64)
        return (weights @ per_group).to(self.dtype)

    def to_dense(self) -> Tensor:
        G = self.groups.num_groups
        rows, cols = self.shape
        check_fits(8 * G * rows * cols, f"the dense NTK ({rows} x {cols}, {G} groups)", self.device)
        grams = ntk_gram(
            self.network, self.groups, self.x1, None if self._is_symmetric else self.x2, budget=self.budget
        )
        weights = self._group_weights().to(torch.float64)
        return torch.einsum("g,gij->ij", weights, grams).to(self.dtype)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        # Contract the Jacobians of only the examples the indices touch.
        C = self.network.num_outputs
        shape = torch.broadcast_shapes(row_index.shape, col_index.shape)
        rows, cols = row_index.expand(shape).reshape(-1), col_index.expand(shape).reshape(-1)
        rpts, rinv = torch.unique(torch.div(rows, C, rounding_mode="floor"), return_inverse=True)
        cpts, cinv = torch.unique(torch.div(cols, C, rounding_mode="floor"), return_inverse=True)
        grams = ntk_gram(self.network, self.groups, self.x1[rpts], self.x2[cpts], budget=self.budget)
        block = torch.einsum("g,gij->ij", self._group_weights().to(torch.float64), grams)
        values = block[rinv * C + rows % C, cinv * C + cols % C]
        return values.reshape(shape).to(self.dtype)

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        return BatchRepeatLinearOperator(self, batch_repeat=batch_shape)
