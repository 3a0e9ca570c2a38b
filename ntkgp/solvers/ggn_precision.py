r"""Solves with the GGN posterior precision at a new :math:`\Lambda`, preconditioned by an exact solver at an old one.

The linearized model's Newton iterations (:mod:`ntkgp.solvers.mode`) solve with

.. math::
    A(f) = P_0 + J^\top\Lambda(f)J \qquad (P\times P),

where the Jacobian :math:`J` of the training inputs is fixed (the network's point :math:`\hat\theta` does not
move) and only the per-point GGN blocks :math:`\Lambda(f) = B(f)B(f)^\top` change with the iterate :math:`f`.
An exact Laplace solver factors :math:`A` once per :math:`\Lambda` (a ``P x P`` GGN, or per-group
``(NC)^2`` sandwiches, and a Cholesky factor): building one per Newton step repeats the network-side work
and the factorization at every step.

:func:`ggn_precision_solve` solves :math:`A(f)X = V` instead by preconditioned conjugate gradients: each
iteration multiplies by :math:`A(f)` with one batched jvp and one batched vjp of the fixed network,

.. math::
    A(f)\,v = P_0 v + J^\top B\,(B^\top (J v)),

and the preconditioner is an exact solver's :math:`A(f_{\text{ref}})^{-1}` at another iterate (the last one
factored). Near the mode :math:`\Lambda` changes little between iterates, so
:math:`A(f_{\text{ref}})^{-1}A(f)` is close to the identity and CG converges in a few iterations, to the
stated relative residual. When it does not, the caller factors :math:`A(f)` exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.cg import CGResult, conjugate_gradients
from ntkgp.linalg.hessian_root import apply_root, apply_root_transpose
from ntkgp.ntk import NTKProblem, pullback, pushforward
from ntkgp.solvers.laplace import KernelSpaceLaplaceSolver, WeightSpaceLaplaceSolver

__all__ = ["ggn_precision_matmul", "ggn_precision_solve"]


def ggn_precision_matmul(problem: NTKProblem, hessian_root: Tensor, delta: Tensor, columns: Tensor) -> Tensor:
    r""":math:`(P_0 + J^\top BB^\top J)V` for ``V`` ``(P, t)``: ``(P, t)``, float64 (one jvp and one vjp pass).

    ``hessian_root`` is :math:`B` ``(N, C, C)``, ``delta`` the prior precisions ``(G,)``; with a process group
    the pulled-back part is summed over ranks (``V`` is the same on every rank)."""
    x, C = problem.x, problem.num_outputs
    t = columns.shape[1]
    v = columns.to(torch.float64)
    pushed = pushforward(problem.ntk, x, v.T).to(torch.float64)  # shape: (t, N, C)
    rows = pushed.reshape(t, -1).T  # shape: (N C, t)
    weighted = apply_root(hessian_root, apply_root_transpose(hessian_root, rows))  # shape: (N C, t)
    pulled = pullback(problem.ntk, x, weighted.T.reshape(t, x.num, C))  # shape: (t, P)
    pulled = problem.sharding.sum(pulled)
    return problem.layout.expand(delta.to(torch.float64)).unsqueeze(-1) * v + pulled.T


def ggn_precision_solve(
    problem: NTKProblem,
    hessian_root: Tensor,
    delta: Tensor,
    rhs: Tensor,
    reference: KernelSpaceLaplaceSolver | WeightSpaceLaplaceSolver,
    *,
    tolerance: float,
    max_iterations: int,
) -> CGResult:
    r""":math:`A(f)^{-1}V` by conjugate gradients preconditioned with ``reference`` (an exact solver at another
    :math:`\Lambda`, its ``precision_solve`` at the same ``delta``).

    ``rhs`` is ``V`` ``(P, t)``; the result's ``solution`` is ``(P, t)``, float64, and ``converged`` says whether
    every column reached ``tolerance`` (relative residual) within ``max_iterations``."""
    delta = delta.detach()
    root = hessian_root.detach().to(torch.float64)
    return conjugate_gradients(
        lambda v: ggn_precision_matmul(problem, root, delta, v),
        rhs.to(torch.float64),
        precondition=lambda r: reference.precision_solve(delta, r),
        tolerance=tolerance,
        max_iterations=max_iterations,
    )
