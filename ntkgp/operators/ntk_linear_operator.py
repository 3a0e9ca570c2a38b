r"""The empirical NTK :math:`K(X_1, X_2) = \sum_g \delta_g^{-1} J_g(X_1) J_g(X_2)^\top` as a lazy
operator of shape ``(N1*C) x (N2*C)``."""

from __future__ import annotations

import warnings

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ntkgp.cholesky import cholesky, cholesky_solve
from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import ntk_gram, ntk_gram_diagonal
from ntkgp.memory import available_memory, check_fits
from ntkgp.operators._batch import expand_dense, unsqueeze_dense
from ntkgp.operators.jacobian_linear_operator import _as_columns, _from_columns
from ntkgp.parameter_groups import ParameterGroups
from ntkgp.structured_matvec import factor_kernel_matmul, supports_factor_matmul

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

    def _set_requires_grad(self, val: bool) -> None:
        # Only the prior precisions are differentiable; inputs and network weights are not.
        self.prior_precision.requires_grad_(val)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, batch = _as_columns(rhs)
        if torch.is_grad_enabled() and self.prior_precision.requires_grad:
            out = self._matmul_differentiable(cols)
        else:
            inv_delta = self.prior_precision.detach().reciprocal()
            t = cols.shape[-1]
            if supports_factor_matmul(self.network, t):  # all nn.Linear: no Jacobian, no jvp / vjp
                columns = cols.T.reshape(t, self.x2.shape[0], self.network.num_outputs)
                out = factor_kernel_matmul(self.network, self.groups, self.x1, self.x2, inv_delta, columns,
                                           self.budget)
            else:
                tangents = self._scaled_pullback(self.x2, cols, inv_delta)  # shape: (t, P)
                out = self.network.jvp(self.x1, tangents)  # shape: (t, N1, C)
            out = out.reshape(out.shape[0], -1).T.to(rhs.dtype)
        return _from_columns(out, batch, rhs.shape[-1])

    def _matmul_differentiable(self, cols: Tensor) -> Tensor:
        """``K @ cols`` as ``sum_g (J_g J_g^T cols) / delta_g``, differentiable in ``delta`` by autograd.

        Costs G jvps per column instead of one, so it is used only when autograd needs it
        (linear_operator's own autograd functions call :meth:`_bilinear_derivative` instead).
        """
        G, t = self.groups.num_groups, cols.shape[-1]
        pulled = self._scaled_pullback(self.x2, cols.detach(), None)  # shape: (t, P)
        masked = torch.zeros(G, t, pulled.shape[-1], dtype=pulled.dtype, device=pulled.device)
        for g, start, stop in self.groups.column_ranges(self.network.offsets):
            masked[g, :, start:stop] = pulled[:, start:stop]
        out = self.network.jvp(self.x1, masked.reshape(G * t, -1)).reshape(G, t, -1)  # shape: (G, t, M1)
        return torch.einsum("g,gtm->mt", self.prior_precision.reciprocal().to(cols.dtype), out.to(cols.dtype))

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

    # ---------------------------------------------------------- exact solves
    def _dense_fits(self) -> bool:
        rows, cols = self.shape
        return 8 * (self.groups.num_groups + 3) * rows * cols <= available_memory(self.device) // 2

    def _exact_or_warn(self) -> bool:
        if self._dense_fits():
            return True
        warnings.warn(
            f"the {self.shape[0]} x {self.shape[1]} NTK does not fit in memory for an exact Cholesky; "
            "falling back to linear_operator's CG / Lanczos, whose accuracy is set by "
            "gpytorch.settings.cg_tolerance, max_cg_iterations and num_trace_samples",
            stacklevel=3,
        )
        return False

    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Exact (Cholesky) when the dense kernel fits in memory; else linear_operator's CG/SLQ."""
        if not self._exact_or_warn():
            return super().inv_quad_logdet(inv_quad_rhs, logdet, reduce_inv_quad)
        factor = cholesky(self.to_dense(), what="the NTK")
        zero = torch.zeros((), dtype=factor.dtype, device=factor.device)
        inv_quad, log_det = zero, zero
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            inv_quad = torch.linalg.solve_triangular(factor, rhs.to(factor.dtype), upper=False).square().sum(-2)
            if reduce_inv_quad:
                inv_quad = inv_quad.sum(-1)
        if logdet:
            log_det = 2.0 * factor.diagonal().log().sum()
        return inv_quad, log_det

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """Exact (Cholesky) when the dense kernel fits in memory; else linear_operator's CG."""
        if not self._exact_or_warn():
            return super().solve(right_tensor, left_tensor)
        factor = cholesky(self.to_dense(), what="the NTK")
        rhs = right_tensor.unsqueeze(-1) if right_tensor.dim() == 1 else right_tensor
        res = cholesky_solve(rhs.to(factor.dtype), factor)
        res = res.squeeze(-1) if right_tensor.dim() == 1 else res
        return res if left_tensor is None else left_tensor.to(res.dtype) @ res

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
        return expand_dense(self, batch_shape)

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        return unsqueeze_dense(self, dim)
