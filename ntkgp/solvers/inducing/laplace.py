r"""The inducing-point Laplace GP of a non-Gaussian likelihood (see :mod:`ntkgp.solvers.inducing`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.hessian_root import apply_root_transpose
from ntkgp.ntk import NTKProblem, captures, point_blocks
from ntkgp.ntk.captures import rows_within
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
        for start, xc in self.network.chunks(problem.x, self._chunk_rows(), desc="inducing caches"):
            root = hessian_root[start : start + xc.num]
            cross = self.cross(xc)
            left = torch.stack([apply_root_transpose(root, cross[g]) for g in range(G)])
            self._add_outer(self.phi[0], left)
        self.sharding.sum_(self.phi)
        #: per-group :math:`\operatorname{tr}(B^\top K^g B)`, ``(G,)`` (summed over ranks)
        self.traces = self.sharding.sum_(self._laplace_traces())

    def _laplace_traces(self) -> Tensor:
        r""":math:`\operatorname{tr}(B^\top K^g B) = \sum_n \operatorname{tr}(B_n^\top K^g_{nn} B_n)` per group."""
        G, ntk, x = self.layout.num_groups, self.ntk, self.problem.x
        out = torch.zeros(G, dtype=torch.float64, device=self.network.device)
        C = self.problem.num_outputs
        generic_width = self.layout.width(ntk.plan().generic)
        rows = max(1, self.problem.budget // (4 * C * (generic_width * self.network.dtype.itemsize + 8 * C)))
        if ntk.plan().units:  # a chunk's captures are held too
            rows = min(rows, rows_within(ntk, x, self.problem.budget // 4))
        for start, xc in self.network.chunks(x, rows, desc="inducing traces"):
            b = self.hessian_root[start : start + xc.num].to(torch.float64)
            captured = captures(ntk, xc) if ntk.plan().units else None
            for g in range(G):  # one-hot prior variances select group g
                one_hot = torch.zeros(G, dtype=torch.float64, device=out.device)
                one_hot[g] = 1.0
                blocks = point_blocks(ntk, xc, one_hot, captured=captured)  # shape: (n, C, C)
                out[g] += torch.einsum("nca,ncd,nda->", b, blocks, b)
        return out

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
