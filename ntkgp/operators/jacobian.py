r"""The network Jacobian :math:`J(X)` as a lazy ``(N*C) x P`` linear operator."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.memory import check_fits
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK, jacobian, pullback, pushforward
from ntkgp.operators._batch import DeviceBoundOperator
from ntkgp.operators._columns import as_columns, from_columns

__all__ = ["JacobianLinearOperator"]


class JacobianLinearOperator(DeviceBoundOperator):
    r"""Lazy Jacobian :math:`J(X)` of a network at :math:`\hat\theta` (or its transpose).

    A thin adapter over :mod:`ntkgp.ntk`:

    * ``J @ V`` (``V`` of shape ``(P, t)``) is :func:`~ntkgp.ntk.pushforward` (batched jvps);
    * ``J.mT @ U`` (``U`` of shape ``(N*C, t)``) is :func:`~ntkgp.ntk.pullback` (batched vjps);
    * ``to_dense()`` is :func:`~ntkgp.ntk.jacobian` chunk by chunk.

    Rows are point-major: row ``n * C + c`` is output ``c`` of example ``n``.

    Parameters
    ----------
    ntk:
        The products engine (network, layout, budget).
    x:
        The inputs, ``N`` examples.
    transposed:
        Represent :math:`J^\top`, shape ``(P, N*C)``, instead.
    """

    def __init__(self, *, ntk: EmpiricalNTK, x: Inputs, transposed: bool = False) -> None:
        super().__init__(ntk=ntk, x=x, transposed=transposed)
        self.ntk, self.x, self.transposed = ntk, x, transposed

    @property
    def dtype(self) -> torch.dtype:
        return self.ntk.network.dtype

    @property
    def device(self) -> torch.device:
        return self.ntk.network.device

    def _size(self) -> torch.Size:
        rows = self.x.num * self.ntk.num_outputs
        cols = self.ntk.network.num_parameters
        return torch.Size((cols, rows) if self.transposed else (rows, cols))

    def _transpose_nonbatch(self) -> JacobianLinearOperator:
        return JacobianLinearOperator(ntk=self.ntk, x=self.x, transposed=not self.transposed)

    def _jvp_columns(self, rhs: Tensor) -> Tensor:
        # shape: rhs (P, t) -> (N*C, t)
        out = pushforward(self.ntk, self.x, rhs.T)  # shape: (t, N, C)
        return out.reshape(out.shape[0], -1).T.to(rhs.dtype)

    def _vjp_columns(self, rhs: Tensor) -> Tensor:
        # shape: rhs (N*C, t) -> (P, t)
        cot = rhs.T.reshape(rhs.shape[-1], self.x.num, self.ntk.num_outputs)
        return pullback(self.ntk, self.x, cot).T.to(rhs.dtype)

    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, batch = as_columns(rhs)
        out = self._vjp_columns(cols) if self.transposed else self._jvp_columns(cols)
        return from_columns(out, batch, rhs.shape[-1])

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        cols, batch = as_columns(rhs)
        out = self._jvp_columns(cols) if self.transposed else self._vjp_columns(cols)
        return from_columns(out, batch, rhs.shape[-1])

    def _set_requires_grad(self, val: bool) -> None:
        pass  # no differentiable parameters: the network's inputs and weights are held fixed

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        return ()  # the network's inputs and weights are not differentiated

    def to_dense(self) -> Tensor:
        n_rows, n_cols = self.shape
        check_fits(n_rows * n_cols * self.dtype.itemsize, f"the dense Jacobian ({n_rows} x {n_cols})", self.device)
        network = self.ntk.network
        rows = [
            jacobian(self.ntk, xc).reshape(-1, network.num_parameters)
            for _, xc in network.chunks(self.x, network.chunk_size())
        ]
        dense = torch.cat(rows, 0)
        return dense.T if self.transposed else dense
