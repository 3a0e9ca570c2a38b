r"""The interface shared by the solvers, and the pieces they have in common.

A solver holds what does not depend on the hyperparameters (per-group Grams, :math:`J^\top J`,
a Krylov basis, inducing-point statistics), computed once from an
:class:`~ntkgp.ntk.NTKProblem`. Its methods take the current prior precisions ``delta`` ``(G,)``
and the noise diagonal ``noise`` ``(N*C,)`` as tensor arguments, so gradients flow to them by
ordinary autograd. Solvers reach the network only through the products layer (:mod:`ntkgp.ntk`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from ntkgp.distributed import ONE_PROCESS, Sharding
from ntkgp.errors import NoiseVariesError
from ntkgp.linalg.cholesky import cholesky
from ntkgp.network.functional import FunctionalNetwork
from ntkgp.ntk import EmpiricalNTK, NTKProblem, gram_diagonal, pullback
from ntkgp.ntk.layout import PriorLayout
from ntkgp.posteriors.base import Posterior

__all__ = [
    "EvidenceOnlyGaussianSolver",
    "GaussianSolver",
    "LaplaceSolver",
    "SolverBase",
    "SolverSpec",
    "needs_grad",
    "output_noise",
]


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will want gradients of a result computed from ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def output_noise(
    noise: Tensor, num_outputs: int, solver: str, *, per_output: bool = True, sharding: Sharding = ONE_PROCESS
) -> Tensor:
    """One noise variance per output, ``(C,)``, float64, from the diagonal ``(N*C,)``; with
    ``per_output=False``, one variance for every training output, ``(1,)``.

    Raises :class:`~ntkgp.errors.NoiseVariesError` (naming ``solver``) when the noise varies more
    than that: these solvers factor the kernel once for all noise values. With a process group
    (``sharding``) ``noise`` is this rank's rows; the check covers every rank (collective), and the
    result is replicated (:meth:`~ntkgp.distributed.Sharding.agree`).
    """
    per_point = noise.reshape(-1, num_outputs if per_output else 1)
    varies = not torch.equal(per_point.detach(), per_point[:1].detach().expand_as(per_point))
    if sharding.distributed:
        first = per_point[0].detach().to(torch.float64)
        spread = sharding.max(torch.cat([first, -first, torch.tensor([float(varies)], device=first.device)]))
        c = first.numel()
        varies = bool(spread[-1] > 0) or not torch.equal(spread[:c], -spread[c : 2 * c])
    if varies:
        needs = (
            "noise that is the same for every data point (per-output noise is fine)"
            if per_output
            else "one noise variance for every training output (e.g. GaussianLikelihood)"
        )
        raise NoiseVariesError(
            f"the {solver} solver needs {needs}; this likelihood's noise varies over the data: use an exact "
            "solver ('kernel') for it"
        )
    return sharding.agree(per_point[0].to(torch.float64))


class SolverBase:
    """What every solver holds: the training problem (network, prior layout, inputs, budget)."""

    #: short name reported in docs and reprs
    name: str = ""
    #: whether the solver's evidence and posterior are exact (direct linear algebra)
    exact: bool = True

    def __init__(self, problem: NTKProblem) -> None:
        self.problem = problem
        self._last_factor: tuple[tuple[Tensor, ...], Tensor] | None = None

    @property
    def ntk(self) -> EmpiricalNTK:
        return self.problem.ntk

    @property
    def network(self) -> FunctionalNetwork:
        return self.problem.network

    @property
    def layout(self) -> PriorLayout:
        return self.problem.layout

    @property
    def size(self) -> int:
        """M = N * C, the side of the training covariance (with a process group: this rank's rows)."""
        return self.problem.size

    @property
    def sharding(self) -> Sharding:
        """How the training data are split over processes (:mod:`ntkgp.distributed`)."""
        return self.problem.sharding

    def cached_factor(self, compute: Callable[[], Tensor], *key: Tensor) -> Tensor:
        """A Cholesky factor, reused when the hyperparameters ``key`` are unchanged.

        The evidence and then the posterior at the same hyperparameters share one factorization.
        A call that needs gradients (some ``key`` requires grad) always factorizes afresh.
        """
        values = tuple(k.detach() for k in key)
        if not needs_grad(*key) and self._last_factor is not None:
            old, factor = self._last_factor
            if all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(old, values)):
                return factor
        factor = compute()
        self._last_factor = (tuple(v.clone() for v in values), factor.detach())
        return factor

    @property
    def last_factor(self) -> tuple[tuple[Tensor, ...], Tensor] | None:
        """The most recent cached factor with the hyperparameters it was computed at, or ``None``."""
        return self._last_factor

    def seed_factor(self, factor: Tensor, *key: Tensor) -> None:
        """Cache ``factor`` as the factor at the hyperparameters ``key`` (a factor updated rather than
        recomputed, :mod:`ntkgp.solvers.update`)."""
        self._last_factor = (tuple(k.detach().clone() for k in key), factor.detach())

    def factor_and_matrix(self, build: Callable[[], Tensor], what: str, *key: Tensor) -> tuple[Tensor, Tensor | None]:
        """The cached Cholesky factor of ``build()`` at the hyperparameters ``key`` (no gradient), and,
        when gradients are wanted, ``build()`` itself, differentiable, for
        :func:`~ntkgp.linalg.cholesky.factored_inv_quad_logdet` (else ``None``).

        The matrix is built once: when the factor is not cached it is factored from that matrix.
        """
        matrix = build() if needs_grad(*key) else None
        source = build if matrix is None else matrix.detach
        return self.cached_factor(lambda: cholesky(source(), what=what), *(k.detach() for k in key)), matrix

    def exact_diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        """The diagonal of the exact :math:`K + S` (per-group squared Jacobian norms), ``(M,)``."""
        per_group = gram_diagonal(self.ntk, self.problem.x)
        return delta.to(torch.float64).reciprocal() @ per_group + noise.to(torch.float64)

    def posterior_weights(self, delta: Tensor, coefficients: Tensor) -> Tensor:
        r""":math:`\bar\theta = P_0^{-1} J^\top \alpha` for kernel-space coefficients ``alpha`` ``(N*C,)``: ``(P,)``."""
        cot = coefficients.reshape(1, self.problem.num_data, self.problem.num_outputs)
        pulled = pullback(self.ntk, self.problem.x, cot, scale=delta.to(torch.float64).reciprocal())
        return self.sharding.sum(pulled)[0]

    def correction(self, delta: Tensor, noise: Tensor | None) -> Tensor:
        r"""A term approximate solvers add to the log evidence, differentiable (zero here).

        The inducing-point solver returns the collapsed bound's trace term
        :math:`-\tfrac12\operatorname{tr}(\Lambda (K - Q))`. ``noise`` is ``None`` for
        non-Gaussian likelihoods.
        """
        return torch.zeros((), dtype=torch.float64, device=self.network.device)


class GaussianSolver(SolverBase, ABC):
    r"""Linear algebra with :math:`K(\delta) + \operatorname{diag}(s)` on the training inputs,
    for Gaussian likelihoods: exact (direct, non-iterative) unless ``exact`` is ``False``, when
    :math:`K` is replaced by an approximation (e.g. the Nystrom kernel :math:`Q` of inducing
    points) and every method refers to that approximation."""

    @abstractmethod
    def inv_quad_logdet(self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool) -> tuple[Tensor, Tensor]:
        r"""Per-column :math:`r^\top (K + S)^{-1} r` (``(t,)``) and :math:`\log|K + S|`, differentiable."""

    @abstractmethod
    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        r""":math:`(K + S)^{-1}\,\text{rhs}`, ``rhs`` of shape ``(M, t)``, differentiable."""

    @abstractmethod
    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        """:math:`K + S` as a dense ``(M, M)`` float64 tensor, differentiable."""

    @abstractmethod
    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        """:math:`(K + S)\\,\\text{rhs}` without gradient tracking."""

    @abstractmethod
    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        """The diagonal of :math:`K + S`, ``(M,)``."""

    @abstractmethod
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> Posterior:
        """The posterior given targets minus prior mean, ``residual`` ``(M,)``; no gradients."""

    def bilinear_derivative(self, delta: Tensor, noise: Tensor, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        r"""Gradients of :math:`\sum_t l_t^\top (K + S) r_t` w.r.t. ``delta`` and ``noise``:
        :math:`-\sum_t (J_g^\top l_t)\cdot(J_g^\top r_t)/\delta_g^2` (two pullbacks) and :math:`l \odot r`."""
        x, C = self.problem.x, self.problem.num_outputs
        u = self.sharding.sum(pullback(self.ntk, x, left.T.reshape(left.shape[1], x.num, C)))
        v = self.sharding.sum(pullback(self.ntk, x, right.T.reshape(right.shape[1], x.num, C)))
        per_group = self.layout.group_sums((u * v).sum(0))
        grad_delta = -per_group / delta.detach().to(torch.float64).square()
        return grad_delta.to(delta.dtype), (left * right).sum(-1).to(noise.dtype)


class EvidenceOnlyGaussianSolver(GaussianSolver, ABC):
    """An approximate Gaussian solver that gives the evidence and the posterior only.

    Its approximation is never an ``N C x N C`` covariance one could solve with, multiply by or
    form (inducing points, subset of data), so :meth:`solve`, :meth:`dense` and :meth:`matmul`
    raise; :meth:`diagonal` gives the exact prior variances plus noise.
    """

    exact = False

    def _refuse(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"the {self.name!r} solver does not {what} the N x N training covariance; use log_evidence() "
            "or the posterior, or solver='kernel' for the exact covariance"
        )

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        raise self._refuse("solve with")

    def dense(self, delta: Tensor, noise: Tensor) -> Tensor:
        raise self._refuse("form")

    def matmul(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        raise self._refuse("multiply by")

    def diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        """The diagonal of the exact :math:`K + S` (the prior variances plus noise)."""
        return self.exact_diagonal(delta, noise)


class LaplaceSolver(SolverBase, ABC):
    r"""Linear algebra for the Laplace GP of a non-Gaussian likelihood, with the per-point GGN
    blocks :math:`\Lambda = BB^\top` fixed at the MAP (``hessian_root`` ``B`` ``(N, C, C)``)."""

    def __init__(self, problem: NTKProblem, hessian_root: Tensor) -> None:
        super().__init__(problem)
        self.hessian_root = hessian_root

    @abstractmethod
    def log_det(self, delta: Tensor) -> Tensor:
        r""":math:`\log|I + B^\top K B|` (or its approximation), differentiable in ``delta``."""

    @abstractmethod
    def laplace_posterior(self, delta: Tensor) -> Posterior:
        """The Laplace posterior at prior precisions ``delta``, centred at the MAP; no gradients."""


class SolverSpec(ABC):
    """An approximate route for ``LinearizedGP(..., solver=spec)``: its settings, and how to build
    its solver for a Gaussian or a Laplace (non-Gaussian) likelihood."""

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        """Raise a ``ValueError`` naming the spec if its setting ``name`` is not one of ``choices``."""
        value = getattr(self, name)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
            raise ValueError(f"{type(self).__name__} {name} must be {allowed}, got {value!r}")

    @abstractmethod
    def gaussian(self, problem: NTKProblem) -> GaussianSolver:
        """The solver for a Gaussian likelihood."""

    @abstractmethod
    def laplace(self, problem: NTKProblem, hessian_root: Tensor) -> LaplaceSolver:
        """The solver for a Laplace likelihood with per-point GGN roots ``B`` ``(N, C, C)``."""
