r"""A posterior whose covariance is the prior NTK minus a weight-space low-rank downdate.

.. math::
    \Sigma_{**} = K_{**} - (J_* W)(J_* W)^\top,\qquad W \in \mathbb R^{P \times r}.

The Lanczos posterior (:math:`W = P_0^{-1} J^\top B U (I + S)^{-1/2}` from the top-``r``
eigenpairs :math:`B^\top K B \approx U S U^\top`) and a LOVE-style variance cache of the CG route
(:math:`W = P_0^{-1} J^\top Q\, L_T^{-\top}` from a Lanczos decomposition
:math:`K + S \approx Q T Q^\top`, :math:`T = L_T L_T^\top`) both have this form. A test block
costs one batched jvp with ``r`` tangents (``O(r)`` per test point after it) plus its prior
blocks; no training data is touched at prediction time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK, pushforward
from ntkgp.posteriors.downdate import DowndatePosterior

__all__ = ["LowRankPosterior"]


class LowRankPosterior(DowndatePosterior):
    r"""Predictive covariance :math:`K_{**} - (J_* W)(J_* W)^\top`.

    Parameters
    ----------
    ntk:
        The products engine.
    delta:
        Prior precisions ``(G,)`` (for :math:`K_{**}`).
    weights:
        Posterior mean weights :math:`\bar\theta` ``(P,)``, float64 (the MAP for Laplace).
    directions:
        :math:`W` ``(P, r)``; stored in the network's dtype (``P r`` numbers).
    """

    def __init__(self, ntk: EmpiricalNTK, delta: Tensor, weights: Tensor, directions: Tensor) -> None:
        super().__init__(ntk, weights, delta, None, directions.shape[-1])
        #: :math:`W^\top` ``(r, P)`` in the network's dtype
        self.directions = directions.T.to(ntk.network.dtype).contiguous()

    def downdate(self, x: Inputs, cross: Tensor | None) -> Tensor:
        # shape: (r, n, C) -> (r, n*C)
        out = pushforward(self.ntk, x, self.directions)
        return out.reshape(out.shape[0], -1).to(torch.float64)
