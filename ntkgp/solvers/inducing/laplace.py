r"""The inducing-point Laplace GP of a non-Gaussian likelihood (see :mod:`ntkgp.solvers.inducing`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.hessian_root import apply_root_transpose
from ntkgp.ntk import NTKProblem
from ntkgp.posteriors.base import Posterior
from ntkgp.solvers.base import LaplaceSolver
from ntkgp.solvers.inducing.caches import InducingCaches

__all__ = ["InducingLaplaceSolver"]


class InducingLaplaceSolver(InducingCaches, LaplaceSolver):
    r"""The inducing-point Laplace GP: :math:`\log|I + B^\top Q B| + \operatorname{tr}(B^\top(K-Q)B)`."""

    name = "inducing"

    def __init__(
        self,
        problem: NTKProblem,
        indices: Tensor,
        jitter: float,
        hessian_root: Tensor,
        *,
        prior_residual: bool = True,
    ) -> None:
        super().__init__(problem, indices, jitter, blocks=1, prior_residual=prior_residual)
        self.hessian_root = hessian_root
        G = self.layout.num_groups
        #: per-group :math:`\operatorname{tr}(B^\top K^g B) = \sum_n \operatorname{tr}(B_n^\top K^g_{nn} B_n)`,
        #: ``(G,)`` (summed over ranks), from the same pass as :math:`\Phi`
        self.traces = torch.zeros(G, dtype=torch.float64, device=self.network.device)
        for start, xc in self.network.chunks(problem.x, self._chunk_rows(), desc="inducing caches"):
            root = hessian_root[start : start + xc.num]
            products = self.chunk_products(xc, blocks=True)
            left = torch.stack([apply_root_transpose(root, products.cross[g]) for g in range(G)])
            self._add_outer(self.phi[0], left)
            assert products.blocks is not None
            b = root.to(torch.float64)
            self.traces += torch.einsum("nca,gncd,nda->g", b, products.blocks, b)
        self.sharding.sum_(self.phi)
        self.sharding.sum_(self.traces)

    def _pieces(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        one = torch.ones(1, dtype=torch.float64, device=delta.device)
        return self._kzz(delta), self._phi(delta, one)

    def log_det(self, delta: Tensor) -> Tensor:
        r""":math:`\log|I + B^\top Q B| = \log|D| - \log|K_{ZZ}|`, differentiable."""
        return self._log_det_ratio(self._factors(*self._pieces(delta))[2])

    def correction(self, delta: Tensor, noise: Tensor | None) -> Tensor:
        r""":math:`-\tfrac12\operatorname{tr}(B^\top(K - Q)B)`: makes the evidence a lower bound."""
        a = self._factors(*self._pieces(delta))[1]  # tr(A) = tr(K_ZZ^-1 Phi) = tr(B^T Q B)
        return -0.5 * (delta.to(torch.float64).reciprocal() @ self.traces - a.diagonal().sum())

    @torch.no_grad()
    def laplace_posterior(self, delta: Tensor) -> Posterior:
        delta = delta.detach()
        lz, ld = self._predictive_factors(*self._pieces(delta))
        return self._posterior(delta, lz, ld, self.network.flat_params.to(torch.float64))
