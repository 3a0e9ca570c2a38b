r"""The interface shared by the exact solvers.

A solver holds everything about the training data that does not depend on the
hyperparameters (per-group Grams or :math:`J^\top J`), computed once. Its methods take the
current prior precisions ``delta`` ``(G,)`` and the noise diagonal ``noise`` ``(N*C,)`` as
tensor arguments, so gradients flow to them by ordinary autograd.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from ntkgp.cholesky import cholesky
from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import ntk_gram_diagonal
from ntkgp.operators.ntk_linear_operator import NTKLinearOperator
from ntkgp.parameter_groups import ParameterGroups

__all__ = ["GaussianSolver", "LaplaceSolver", "Posterior", "SolverBase", "SolverSpec", "needs_grad"]


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will want gradients of a result computed from ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class SolverBase:
    """What every solver holds: the network, its prior groups, the training inputs, a budget.

    Parameters
    ----------
    network, groups:
        The linearized network and its prior groups.
    x:
        Training inputs ``(N, D)``, flattened.
    budget:
        Bytes for Jacobian blocks in chunked passes.
    """

    #: short name reported in docs and reprs: ``"kernel"`` or ``"weight"``
    name: str = ""

    def __init__(self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int) -> None:
        self.network, self.groups, self.x, self.budget = network, groups, x, budget
        self._last_factor: tuple[tuple[Tensor, ...], Tensor] | None = None

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

    def factor_and_matrix(self, build: Callable[[], Tensor], what: str, *key: Tensor) -> tuple[Tensor, Tensor | None]:
        """The cached Cholesky factor of ``build()`` at the hyperparameters ``key`` (no gradient), and,
        when gradients are wanted, ``build()`` itself, differentiable, for
        :func:`~ntkgp.cholesky.factored_inv_quad_logdet` (else ``None``).

        The matrix is built once: when the factor is not cached it is factored from that matrix.
        """
        matrix = build() if needs_grad(*key) else None
        source = build if matrix is None else matrix.detach
        return self.cached_factor(lambda: cholesky(source(), what=what), *(k.detach() for k in key)), matrix

    @property
    def size(self) -> int:
        """M = N * C, the side of the training covariance."""
        return self.x.shape[0] * self.network.num_outputs

    def exact_diagonal(self, delta: Tensor, noise: Tensor) -> Tensor:
        """The diagonal of the exact :math:`K + S` (per-group squared Jacobian norms), ``(M,)``."""
        per_group = ntk_gram_diagonal(self.network, self.groups, self.x, budget=self.budget)
        return delta.to(torch.float64).reciprocal() @ per_group + noise.to(torch.float64)

    def ntk(self, delta: Tensor) -> NTKLinearOperator:
        """The lazy NTK on the training inputs."""
        return NTKLinearOperator(self.x, self.x, delta, network=self.network, groups=self.groups, budget=self.budget)

    #: whether the solver's evidence and posterior are exact (direct linear algebra)
    exact: bool = True

    def correction(self, delta: Tensor, noise: Tensor | None) -> Tensor:
        r"""A term approximate solvers add to the log evidence, differentiable (zero here).

        The inducing-point solver returns the collapsed bound's trace term
        :math:`-\tfrac12\operatorname{tr}(\Lambda (K - Q))`. ``noise`` is ``None`` for
        non-Gaussian likelihoods.
        """
        return torch.zeros((), dtype=torch.float64, device=self.x.device)


class GaussianSolver(SolverBase, ABC):
    r"""Linear algebra with :math:`K(\delta) + \operatorname{diag}(s)` on the training inputs,
    for Gaussian likelihoods: exact (direct, non-iterative) unless ``exact`` is ``False``, when
    :math:`K` is replaced by an approximation (e.g. the Nystrom kernel :math:`Q` of inducing
    points) and every method refers to that approximation."""

    @abstractmethod
    def inv_quad_logdet(
        self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool
    ) -> tuple[Tensor, Tensor]:
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

    def bilinear_derivative(
        self, delta: Tensor, noise: Tensor, left: Tensor, right: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""Gradients of :math:`\sum_t l_t^\top (K + S) r_t` w.r.t. ``delta`` and ``noise``."""
        grad_delta = self.ntk(delta.detach().requires_grad_(True))._bilinear_derivative(left, right)[2]
        grad_noise = (left * right).sum(-1).to(noise.dtype)
        return grad_delta, grad_noise


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
            "or the posterior, or solver='kernel' for the exact covariance")

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
    blocks :math:`\Lambda = BB^\top` fixed at the MAP."""

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
    def gaussian(self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int) -> GaussianSolver:
        """The solver for a Gaussian likelihood on training inputs ``x`` ``(N, D)``."""

    @abstractmethod
    def laplace(
        self, network: FunctionalNetwork, groups: ParameterGroups, x: Tensor, budget: int, hessian_factor: Tensor
    ) -> LaplaceSolver:
        """The solver for a Laplace likelihood with per-point GGN factors ``B`` ``(N, C, C)``."""


class Posterior(ABC):
    r"""The GP posterior on a fixed set of hyperparameters, with no gradients.

    Its mean is :math:`\mu(x_*) = f(x_*;\hat\theta) + J(x_*)(\bar\theta - \hat\theta)`, where
    :math:`\bar\theta` (``weights``) is the posterior mean of the linearized model's weights.
    """

    def __init__(self, network: FunctionalNetwork, groups: ParameterGroups, weights: Tensor, budget: int) -> None:
        self.network, self.groups, self.budget = network, groups, budget
        #: posterior mean weights, ``(P,)``, float64
        self.weights = weights

    @torch.no_grad()
    def mean(self, x: Tensor) -> Tensor:
        """Predictive mean, ``(N*, C)``, float64."""
        f = self.network.forward(x).to(torch.float64)
        shift = (self.weights - self.network.flat_params.to(torch.float64)).unsqueeze(0)
        if not shift.any():  # the Laplace posterior is centred at the MAP: the mean is f(x)
            return f
        return f + self.network.jvp(x, shift)[0].to(torch.float64)

    def rows_per_block(self, cols: int) -> int:
        """Test points per block so that a ``(block * C) x cols`` float64 matrix fits the budget."""
        return max(1, self.budget // (8 * 4 * self.network.num_outputs * max(cols, 1)))

    @abstractmethod
    def covariance_blocks(self, x: Tensor) -> Tensor:
        """Per-point ``C x C`` blocks of the predictive covariance, ``(N*, C, C)``, float64; memory
        linear in the number of test points."""

    @abstractmethod
    def covariance(self, x: Tensor) -> Tensor:
        """Dense predictive covariance of the latent function, ``(N*C, N*C)``, float64."""

    @abstractmethod
    def covariance_diagonal(self, x: Tensor) -> Tensor:
        """Predictive variances, ``(N*C,)``, float64, chunked over test points."""

    @abstractmethod
    def covariance_matmul(self, x: Tensor, rhs: Tensor) -> Tensor:
        """Predictive covariance times ``rhs`` ``(N*C, t)``, lazily."""
