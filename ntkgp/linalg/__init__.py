"""Matrix-free linear algebra used by the approximate solvers (float64 throughout)."""

from ntkgp.linalg.block_lanczos import block_lanczos
from ntkgp.linalg.cg import CGResult, conjugate_gradients, lanczos_tridiagonal
from ntkgp.linalg.lanczos_decomposition import lanczos_decomposition
from ntkgp.linalg.preconditioner import LowRankPlusDiagonal, pivoted_cholesky
from ntkgp.linalg.slq import gauss_quadrature_log, rademacher, slq_log_det

__all__ = [
    "CGResult",
    "LowRankPlusDiagonal",
    "block_lanczos",
    "conjugate_gradients",
    "gauss_quadrature_log",
    "lanczos_decomposition",
    "lanczos_tridiagonal",
    "pivoted_cholesky",
    "rademacher",
    "slq_log_det",
]
