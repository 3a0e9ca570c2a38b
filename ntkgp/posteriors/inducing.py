r"""The inducing-point posterior: :math:`K_{**} - K_{*Z}(K_{ZZ}^{-1} - D^{-1})K_{Z*}`."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK
from ntkgp.posteriors.downdate import DowndatePosterior

__all__ = ["InducingPosterior"]


class InducingPosterior(DowndatePosterior):
    r"""Covariance :math:`K_{**} - \lVert L_Z^{-1}K_{Z*}\rVert^2 + \lVert L_D^{-1}K_{Z*}\rVert^2`.

    That is :math:`K_{**} - K_{*Z}(K_{ZZ}^{-1} - D^{-1})K_{Z*}` with two triangular solves per
    test block (:math:`O((MC)^2)` per test point) after one structured cross-Gram against the
    ``M`` inducing inputs; no eigendecomposition. Without the prior residual (subset of
    regressors) only :math:`\lVert L_D^{-1}K_{Z*}\rVert^2` remains: one solve.

    Parameters
    ----------
    ntk, weights:
        As for every :class:`~ntkgp.posteriors.base.Posterior`.
    delta:
        Prior precisions ``(G,)``.
    inducing:
        The inducing inputs :math:`Z`.
    lz, ld:
        Cholesky factors of :math:`K_{ZZ}` and :math:`D`, ``(MC, MC)``.
    prior_residual:
        Keep :math:`K_{**} - Q_{**}` (SGPR) or drop it (subset of regressors).
    """

    def __init__(
        self,
        ntk: EmpiricalNTK,
        weights: Tensor,
        delta: Tensor,
        inducing: Inputs,
        lz: Tensor,
        ld: Tensor,
        *,
        prior_residual: bool = True,
    ) -> None:
        super().__init__(
            ntk, weights, delta, inducing, (2 if prior_residual else 1) * lz.shape[-1], prior_residual=prior_residual
        )
        self.lz, self.ld = lz, ld

    def downdate(self, x: Inputs, cross: Tensor | None) -> Tensor:
        assert cross is not None
        return torch.linalg.solve_triangular(self.lz, cross, upper=False)

    def update(self, x: Inputs, cross: Tensor | None) -> Tensor:
        assert cross is not None
        return torch.linalg.solve_triangular(self.ld, cross, upper=False)
