r"""Inducing-point (SGPR / Titsias) solvers: the NTK GP with ``M`` inducing inputs among the data.

With inducing inputs :math:`Z` (``M`` training points, all ``C`` outputs each) the kernel on the
data is replaced by its Nystrom approximation :math:`Q = K_{XZ} K_{ZZ}^{-1} K_{ZX}`.

**Gaussian likelihood** (noise :math:`S`, one variance per output): the hyperparameter
objective is Titsias' collapsed lower bound on the exact log evidence,

.. math::
    \mathcal L = \log\mathcal N(r \mid 0, Q + S) - \tfrac12\operatorname{tr}\big(S^{-1}(K - Q)\big)
    \le \log p(y \mid \delta, S),

and the predictive is the optimal variational posterior (DTC form with the exact prior at the
test points):

.. math::
    \mu_* = m_* + K_{*Z} D^{-1} K_{ZX} S^{-1} r,\qquad
    \Sigma_{**} = K_{**} - K_{*Z}\big(K_{ZZ}^{-1} - D^{-1}\big)K_{Z*},\qquad
    D = K_{ZZ} + K_{ZX} S^{-1} K_{XZ}.

**Laplace likelihoods** (per-point GGN blocks :math:`\Lambda = BB^\top` at the MAP): the same
construction with :math:`S^{-1}` replaced by :math:`\Lambda`. The Laplace evidence's log
determinant is replaced by

.. math::
    \log|I + B^\top Q B| + \operatorname{tr}\big(B^\top (K - Q) B\big) \;\ge\; \log|I + B^\top K B|

(concavity of :math:`\log\det`), so the approximate Laplace evidence is a lower bound on the
exact one, tight when :math:`Q = K`; the predictive covariance is as above with
:math:`D = K_{ZZ} + K_{ZX}\Lambda K_{XZ}` and the mean is :math:`f(x_*;\hat\theta)`.

**Caches** (one pass over the data at construction; nothing after depends on ``N``): per-group
:math:`K^g_{ZZ}` ``(G, MC, MC)``, :math:`\Phi^{(c)}_{gh} = K^g_{Z X_c} W K^h_{X_c Z}` ``(C', G, G,
MC, MC)`` (``C' = C`` Gaussian outputs with their own noise, weights :math:`W = I`; one Laplace
block with :math:`W = \Lambda`), :math:`K^g_{Z X_c} r_c` and the per-group traces. The bound, its
gradients in :math:`\delta` and :math:`S`, and the posterior then cost :math:`O(G^2 (MC)^2 +
(MC)^3)`: hyperparameter fitting is independent of ``N``. Building them costs
:math:`O(G^2 N C (MC)^2)` flops and ``G`` cross-Grams per data chunk. Prediction costs one
structured cross-Gram against :math:`Z` and :math:`O((MC)^2)` per test point.
"""

from ntkgp.posteriors.inducing import InducingPosterior
from ntkgp.solvers.inducing.caches import InducingCaches
from ntkgp.solvers.inducing.gaussian import InducingSolver
from ntkgp.solvers.inducing.laplace import InducingLaplaceSolver
from ntkgp.solvers.inducing.selection import (
    DEFAULT_POOL_SIZE,
    kmeans_points,
    pivoted_cholesky_points,
    random_points,
    select_inducing_points,
)
from ntkgp.solvers.inducing.spec import Inducing

__all__ = [
    "DEFAULT_POOL_SIZE",
    "Inducing",
    "InducingCaches",
    "InducingLaplaceSolver",
    "InducingPosterior",
    "InducingSolver",
    "kmeans_points",
    "pivoted_cholesky_points",
    "random_points",
    "select_inducing_points",
]
