"""Matrix-free linear algebra used by the approximate solvers."""

from ntkgp.linalg.block_lanczos import block_lanczos

__all__ = ["block_lanczos"]
