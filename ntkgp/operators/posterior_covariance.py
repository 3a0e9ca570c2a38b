r"""The exact predictive covariance of the latent function at test inputs, lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ntkgp.memory import check_fits
from ntkgp.network.inputs import Inputs
from ntkgp.operators._batch import DeviceBoundOperator
from ntkgp.operators._columns import as_columns, from_columns

if TYPE_CHECKING:
    from ntkgp.posteriors.base import Posterior

__all__ = ["PosteriorCovariance"]


class PosteriorCovariance(DeviceBoundOperator):
    r"""Posterior covariance :math:`\Sigma_{**}`, ``(N_* C) x (N_* C)``, float64.

    Kernel space: :math:`K_{**} - K_{*X}(K+S)^{-1}K_{X*}`; weight space:
    :math:`J_* (P_0 + J^\top S^{-1} J)^{-1} J_*^\top`. ``diagonal()`` is chunked over test
    points and never forms the full matrix; ``to_dense()`` forms it once and caches it;
    ``matmul`` is lazy (vjp/jvp and the cached Cholesky).
    """

    def __init__(self, *, x: Inputs, posterior: Posterior) -> None:
        super().__init__(x=x, posterior=posterior)
        self.x, self.posterior = x, posterior
        self._dense: Tensor | None = None
        self._diag: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    @property
    def device(self) -> torch.device:
        return self.x.device

    def _size(self) -> torch.Size:
        m = self.x.num * self.posterior.ntk.num_outputs
        return torch.Size((m, m))

    def _transpose_nonbatch(self) -> PosteriorCovariance:
        return self

    def _matmul(self, rhs: Tensor) -> Tensor:
        if self._dense is not None:
            return self._dense.to(rhs.dtype) @ rhs
        cols, batch = as_columns(rhs)
        out = self.posterior.covariance_matmul(self.x, cols).to(rhs.dtype)
        return from_columns(out, batch, rhs.shape[-1])

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        return ()

    def _diagonal(self) -> Tensor:
        if self._diag is None:
            self._diag = (
                self._dense.diagonal() if self._dense is not None else self.posterior.covariance_diagonal(self.x)
            )
        return self._diag

    def point_blocks(self) -> Tensor:
        """Per-point ``C x C`` covariance blocks, ``(N*, C, C)``, without forming the full matrix."""
        if self._dense is not None:
            C = self.posterior.ntk.num_outputs
            n = self._dense.shape[0] // C
            return self._dense.reshape(n, C, n, C).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return self.posterior.covariance_blocks(self.x)

    def to_dense(self) -> Tensor:
        if self._dense is None:
            m = self.shape[-1]
            check_fits(3 * 8 * m * m, f"the dense predictive covariance ({m} x {m}); use .variance", self.device)
            self._dense = self.posterior.covariance(self.x)
        return self._dense
