r"""The NTK plus noise on the training inputs, solved by the model's solver.

This is the covariance that :class:`~ntkgp.models.LinearizedGP` hands GPyTorch in train mode.
Adding a likelihood's diagonal noise keeps the class, and ``inv_quad_logdet`` / ``solve`` go to
the model's :class:`~ntkgp.solvers.GaussianSolver`: exact (Cholesky in kernel or weight space) by
default, or the approximate route the model was built with (CG, Lanczos), never linear_operator's
own CG and stochastic Lanczos quadrature.
"""

from __future__ import annotations

from typing import Protocol

import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator
from torch import Tensor

from ntkgp.operators._batch import UnbatchedOperator
from ntkgp.operators._columns import as_columns, from_columns

__all__ = ["CovarianceSolver", "TrainingCovariance"]


class CovarianceSolver(Protocol):
    """What :class:`TrainingCovariance` needs of a solver (every :class:`~ntkgp.solvers.GaussianSolver` has it)."""

    @property
    def size(self) -> int: ...

    def inv_quad_logdet(
        self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool
    ) -> tuple[Tensor, Tensor]: ...

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor: ...

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor: ...

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor: ...

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor: ...

    def bilinear_derivative(
        self, delta: Tensor, noise: Tensor, left: Tensor, right: Tensor
    ) -> tuple[Tensor, Tensor]: ...


class TrainingCovariance(UnbatchedOperator):
    r""":math:`K(\delta) + \operatorname{diag}(s)` on the training inputs, ``(N*C) x (N*C)``.

    Parameters
    ----------
    prior_precision:
        :math:`\delta`, ``(G,)``.
    noise:
        The noise diagonal :math:`s`, ``(N*C,)`` (zeros for the noise-free prior).
    solver:
        The solver holding what it cached of the training data (Grams, :math:`J^\top J`, a Krylov basis).
    """

    def __init__(self, prior_precision: Tensor, noise: Tensor, *, solver: CovarianceSolver) -> None:
        super().__init__(prior_precision, noise, solver=solver)
        self.prior_precision, self.noise, self.solver = prior_precision, noise, solver

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    @property
    def device(self) -> torch.device:
        return self.noise.device

    def _size(self) -> torch.Size:
        return torch.Size((self.solver.size, self.solver.size))

    def _transpose_nonbatch(self) -> TrainingCovariance:
        return self

    def __add__(self, other: object) -> LinearOperator:
        if isinstance(other, DiagLinearOperator):
            extra = other.diagonal(dim1=-1, dim2=-2).to(torch.float64)
            if extra.shape != self.noise.shape:
                extra = extra.expand(self.noise.shape)
            return TrainingCovariance(self.prior_precision, self.noise + extra, solver=self.solver)
        if isinstance(other, LinearOperator):
            raise NotImplementedError(
                f"ntkgp's training covariance accepts diagonal noise only, got "
                f"{type(other).__name__} (e.g. MultitaskGaussianLikelihood with rank > 0)"
            )
        return super().__add__(other)

    # ----------------------------------------------------------- exact solves
    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor, Tensor]:
        rhs = inv_quad_rhs
        if inv_quad_rhs is not None and inv_quad_rhs.dim() == 1:
            rhs = inv_quad_rhs.unsqueeze(-1)
        inv_quad, log_det = self.solver.inv_quad_logdet(self.prior_precision, self.noise, rhs, logdet)
        if inv_quad_rhs is not None and reduce_inv_quad:
            inv_quad = inv_quad.sum(-1)
        return inv_quad, log_det

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        res = self.solver.solve(self.prior_precision, self.noise, rhs)
        res = res.squeeze(-1) if vector else res
        return res if left_tensor is None else left_tensor.to(res.dtype) @ res

    def _cholesky(self, upper: bool = False) -> LinearOperator:
        from linear_operator.operators import TriangularLinearOperator

        from ntkgp.linalg.cholesky import cholesky

        factor = cholesky(self.to_dense(), what="the training kernel plus noise")
        return TriangularLinearOperator(factor.mT if upper else factor, upper=upper)

    # --------------------------------------------------------------- products
    def _matmul(self, rhs: Tensor) -> Tensor:
        cols, batch = as_columns(rhs)
        out = self.solver.matmul(self.prior_precision, self.noise, cols).to(rhs.dtype)
        return from_columns(out, batch, rhs.shape[-1])

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        left, _ = as_columns(left_vecs)
        right, _ = as_columns(right_vecs)
        return self.solver.bilinear_derivative(self.prior_precision, self.noise, left, right)

    def _diagonal(self) -> Tensor:
        return self.solver.diagonal(self.prior_precision, self.noise)

    def to_dense(self) -> Tensor:
        return self.solver.dense(self.prior_precision, self.noise)
