r"""The network Jacobian :math:`J(X)` as a lazy ``(N*C) x P`` linear operator."""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ntkgp.functional import FunctionalNetwork
from ntkgp.memory import check_fits
from ntkgp.operators._batch import expand_dense, unsqueeze_dense

__all__ = ["JacobianLinearOperator"]


def _as_columns(rhs: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(*B, M, t)`` -> ``(M, prod(B) * t)`` and the trailing shape to restore."""
    if rhs.dim() == 2:
        return rhs, ()
    batch = tuple(rhs.shape[:-2])
    return rhs.movedim(-2, 0).reshape(rhs.shape[-2], -1), batch


def _from_columns(out: Tensor, batch: tuple[int, ...], t: int) -> Tensor:
    """Inverse of :func:`_as_columns`: ``(M, prod(B) * t)`` -> ``(*B, M, t)``."""
    if not batch:
        return out
    return out.reshape(out.shape[0], *batch, t).movedim(0, -2)


class JacobianLinearOperator(LinearOperator):
    r"""Lazy Jacobian :math:`J(X)` of a network at :math:`\hat\theta` (or its transpose).

    * ``J @ V`` (``V`` of shape ``(P, t)``) is a batch of ``t`` jvps, chunked over data;
    * ``J.mT @ U`` (``U`` of shape ``(N*C, t)``) is a batch of ``t`` vjps, chunked over data;
    * ``to_dense()`` contracts chunked per-example Jacobians.

    Rows are point-major: row ``n * C + c`` is output ``c`` of example ``n``.

    Parameters
    ----------
    x:
        Inputs, shape ``(N, D)`` (flattened examples).
    network:
        The :class:`~ntkgp.functional.FunctionalNetwork`.
    transposed:
        Represent :math:`J^\top`, shape ``(P, N*C)``, instead.
    """

    def __init__(self, x: Tensor, *, network: FunctionalNetwork, transposed: bool = False) -> None:
        super().__init__(x, network=network, transposed=transposed)
        self.x = x
        self.network = network
        self.transposed = transposed

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    @property
    def device(self) -> torch.device:
        return self.network.device

    def _size(self) -> torch.Size:
        rows = self.x.shape[0] * self.network.num_outputs
        cols = self.network.num_parameters
        return torch.Size((cols, rows) if self.transposed else (rows, cols))

    def _transpose_nonbatch(self) -> JacobianLinearOperator:
        return JacobianLinearOperator(self.x, network=self.network, transposed=not self.transposed)

    def _jvp_columns(self, rhs: Tensor) -> Tensor:
        # shape: rhs (P, t) -> (N*C, t)
        out = self.network.jvp(self.x, rhs.T)  # shape: (t, N, C)
        return out.reshape(out.shape[0], -1).T.to(rhs.dtype)

    def _vjp_columns(self, rhs: Tensor) -> Tensor:
        # shape: rhs (N*C, t) -> (P, t)
        cot = rhs.T.reshape(rhs.shape[-1], self.x.shape[0], self.network.num_outputs)
        return self.network.vjp(self.x, cot).T.to(rhs.dtype)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, batch = _as_columns(rhs)
        out = self._vjp_columns(cols) if self.transposed else self._jvp_columns(cols)
        return _from_columns(out, batch, rhs.shape[-1])

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        cols, batch = _as_columns(rhs)
        out = self._jvp_columns(cols) if self.transposed else self._vjp_columns(cols)
        return _from_columns(out, batch, rhs.shape[-1])

    def _set_requires_grad(self, val: bool) -> None:
        pass  # no differentiable parameters: the network's inputs and weights are held fixed

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        return (None,)  # the network's inputs and weights are not differentiated

    def to_dense(self) -> Tensor:
        n_rows, n_cols = self.shape
        check_fits(n_rows * n_cols * self.x.element_size(), f"the dense Jacobian ({n_rows} x {n_cols})", self.device)
        rows = [jac.reshape(-1, self.network.num_parameters) for _, jac in
                self.network.iter_jacobians(self.x, self.network.chunk_size())]
        dense = torch.cat(rows, 0)
        return dense.T if self.transposed else dense

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        return expand_dense(self, batch_shape)

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        return unsqueeze_dense(self, dim)
