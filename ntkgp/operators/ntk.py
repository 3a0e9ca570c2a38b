r"""The empirical NTK :math:`K(X_1, X_2) = \sum_g \delta_g^{-1} J_g(X_1) J_g(X_2)^\top` as a lazy
operator of shape ``(N1*C) x (N2*C)``."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ntkgp.linalg.cholesky import cholesky, cholesky_solve, dense_inv_quad_logdet
from ntkgp.memory import available_memory, check_fits
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK, gram, gram_diagonal, kernel_matmul, pullback, pushforward
from ntkgp.operators._batch import DeviceBoundOperator
from ntkgp.operators._columns import as_columns, from_columns

__all__ = ["NTKLinearOperator"]


class NTKLinearOperator(DeviceBoundOperator):
    r"""Lazy empirical NTK with per-group prior precisions, a thin adapter over :mod:`ntkgp.ntk`.

    .. math::
        K(X_1, X_2) = J(X_1)\, P_0^{-1} J(X_2)^\top = \sum_g \delta_g^{-1}\, J_g(X_1) J_g(X_2)^\top

    * ``K @ V`` is :func:`~ntkgp.ntk.kernel_matmul`: a batched vjp at :math:`X_2`, a per-group
      scaling by :math:`1/\delta_g` and a batched jvp at :math:`X_1` (or the factor form of
      structured networks); no ``N x P`` Jacobian and no ``N x N`` matrix is formed.
    * ``diagonal()`` is :func:`~ntkgp.ntk.gram_diagonal`; ``to_dense()`` is :func:`~ntkgp.ntk.gram`
      (memory-checked).
    * Gradients with respect to ``prior_precision`` are exact:
      :math:`\partial (u^\top K v)/\partial\delta_g = -\delta_g^{-2}\,(J_g^\top u)\cdot(J_g^\top v)`.
    * Solves and log-determinants are exact (one Cholesky) whenever the dense kernel fits in
      memory; otherwise linear_operator's CG and Lanczos, with a warning.

    Parameters
    ----------
    prior_precision:
        :math:`\delta`, shape ``(G,)``, positive; may require grad.
    ntk:
        The products engine (network, layout, budget).
    x1, x2:
        The inputs of the rows and of the columns.
    dtype:
        The dtype of dense results (default: the network's); products are computed as described
        whatever it is.
    """

    def __init__(
        self, prior_precision: Tensor, *, ntk: EmpiricalNTK, x1: Inputs, x2: Inputs, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(prior_precision, ntk=ntk, x1=x1, x2=x2, dtype=dtype)
        self.prior_precision = prior_precision
        self.ntk, self.x1, self.x2 = ntk, x1, x2
        self._dtype = ntk.network.dtype if dtype is None else dtype

    # ------------------------------------------------------------------ shape
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def type(self, dtype: torch.dtype) -> NTKLinearOperator:
        """The same operator with dense results in ``dtype`` (``.float()``, ``.double()``)."""
        return NTKLinearOperator(self.prior_precision, ntk=self.ntk, x1=self.x1, x2=self.x2, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.ntk.network.device

    def _size(self) -> torch.Size:
        C = self.ntk.num_outputs
        return torch.Size((self.x1.num * C, self.x2.num * C))

    def _transpose_nonbatch(self) -> NTKLinearOperator:
        return NTKLinearOperator(self.prior_precision, ntk=self.ntk, x1=self.x2, x2=self.x1, dtype=self._dtype)

    @property
    def _is_symmetric(self) -> bool:
        return self.x1 is self.x2 or self.x1.equal(self.x2)

    def _set_requires_grad(self, val: bool) -> None:
        # Only the prior precisions are differentiable; inputs and network weights are not.
        self.prior_precision.requires_grad_(val)

    # ------------------------------------------------------------- products
    def _columns(self, cols: Tensor, x: Inputs) -> Tensor:
        """``(N*C, t)`` -> ``(t, N, C)``."""
        return cols.T.reshape(cols.shape[-1], x.num, self.ntk.num_outputs)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, batch = as_columns(rhs)
        if torch.is_grad_enabled() and self.prior_precision.requires_grad:
            out = self._matmul_differentiable(cols)
        else:
            inv_delta = self.prior_precision.detach().reciprocal()
            out = kernel_matmul(self.ntk, self.x1, self.x2, inv_delta, self._columns(cols, self.x2))
            out = out.reshape(out.shape[0], -1).T.to(rhs.dtype)
        return from_columns(out, batch, rhs.shape[-1])

    def _matmul_differentiable(self, cols: Tensor) -> Tensor:
        """``K @ cols`` as ``sum_g (J_g J_g^T cols) / delta_g``, differentiable in ``delta`` by autograd.

        Costs G jvps per column instead of one, so it is used only when autograd needs it
        (linear_operator's own autograd functions call :meth:`_bilinear_derivative` instead).
        """
        G, t = self.ntk.layout.num_groups, cols.shape[-1]
        pulled = pullback(self.ntk, self.x2, self._columns(cols.detach(), self.x2))  # shape: (t, P)
        masked = torch.zeros(G, t, pulled.shape[-1], dtype=pulled.dtype, device=pulled.device)
        for g, start, stop in self.ntk.layout.column_ranges():
            masked[g, :, start:stop] = pulled[:, start:stop]
        out = pushforward(self.ntk, self.x1, masked.reshape(G * t, -1)).reshape(G, t, -1)  # shape: (G, t, M1)
        return torch.einsum("g,gtm->mt", self.prior_precision.reciprocal().to(cols.dtype), out.to(cols.dtype))

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._transpose_nonbatch()._matmul(rhs)

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        if not self.prior_precision.requires_grad:
            return (None,)
        left, _ = as_columns(left_vecs)
        right, _ = as_columns(right_vecs)
        u = pullback(self.ntk, self.x1, self._columns(left, self.x1))
        v = pullback(self.ntk, self.x2, self._columns(right, self.x2))
        per_group = self.ntk.layout.group_sums((u * v).sum(0))
        delta = self.prior_precision.detach()
        return ((-per_group.to(delta.dtype) / delta.square()),)

    # ---------------------------------------------------------- exact solves
    def _dense_fits(self) -> bool:
        rows, cols = self.shape
        return 8 * (self.ntk.layout.num_groups + 3) * rows * cols <= available_memory(self.device) // 2

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
        return dense_inv_quad_logdet(
            self.to_dense(), inv_quad_rhs, logdet, what="the NTK", reduce_inv_quad=reduce_inv_quad
        )

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
    def _weights(self) -> Tensor:
        return self.prior_precision.reciprocal().to(torch.float64)

    def _diagonal(self) -> Tensor:
        if not self._is_symmetric:
            raise RuntimeError("the diagonal of a cross-covariance NTK operator (x1 != x2) is undefined")
        return (self._weights() @ gram_diagonal(self.ntk, self.x1)).to(self.dtype)

    def to_dense(self) -> Tensor:
        G = self.ntk.layout.num_groups
        rows, cols = self.shape
        check_fits(8 * G * rows * cols, f"the dense NTK ({rows} x {cols}, {G} groups)", self.device)
        grams = gram(self.ntk, self.x1, None if self._is_symmetric else self.x2)
        return self.ntk.layout.weighted(self._weights(), grams).to(self.dtype)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        # Contract the Jacobians of only the examples the indices touch.
        C = self.ntk.num_outputs
        shape = torch.broadcast_shapes(row_index.shape, col_index.shape)
        rows, cols = row_index.expand(shape).reshape(-1), col_index.expand(shape).reshape(-1)
        rpts, rinv = torch.unique(torch.div(rows, C, rounding_mode="floor"), return_inverse=True)
        cpts, cinv = torch.unique(torch.div(cols, C, rounding_mode="floor"), return_inverse=True)
        block = gram(self.ntk, self.x1[rpts], self.x2[cpts], weights=self._weights())
        values = block[rinv * C + rows % C, cinv * C + cols % C]
        return values.reshape(shape).to(self.dtype)
