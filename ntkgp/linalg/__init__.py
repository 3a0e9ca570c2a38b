"""Linear algebra below the solvers: Cholesky with reported trouble, Krylov methods, preconditioners, quadrature.

Float64 throughout; nothing here knows about networks."""

from ntkgp.linalg.block_lanczos import block_lanczos
from ntkgp.linalg.cg import CGResult, conjugate_gradients, lanczos_tridiagonal
from ntkgp.linalg.cholesky import (
    cholesky,
    cholesky_logdet,
    cholesky_solve,
    dense_inv_quad_logdet,
    factored_inv_quad_logdet,
)
from ntkgp.linalg.hessian_root import apply_root, apply_root_transpose, sandwich
from ntkgp.linalg.lanczos_decomposition import lanczos_decomposition
from ntkgp.linalg.preconditioner import LowRankPlusDiagonal, pivoted_cholesky
from ntkgp.linalg.slq import gauss_quadrature_log, rademacher, slq_log_det

__all__ = [
    "CGResult",
    "LowRankPlusDiagonal",
    "apply_root",
    "apply_root_transpose",
    "block_lanczos",
    "cholesky",
    "cholesky_logdet",
    "cholesky_solve",
    "dense_inv_quad_logdet",
    "factored_inv_quad_logdet",
    "conjugate_gradients",
    "gauss_quadrature_log",
    "lanczos_decomposition",
    "lanczos_tridiagonal",
    "pivoted_cholesky",
    "rademacher",
    "sandwich",
    "slq_log_det",
]
