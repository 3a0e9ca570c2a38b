r"""The posterior mode of the linearized model, for the Laplace likelihoods, and the Laplace GP taken there.

The linearized network :math:`f_{\text{lin}}(x;\theta) = m(x) + J(x)\theta`, with the fixed offset
:math:`m(x) = f(x;\hat\theta) - J(x)\hat\theta` and the prior :math:`\theta\sim\mathcal N(0, P_0^{-1})`, is a
generalized linear model. Its posterior mode minimizes the convex

.. math::
    \Psi(\theta) = -\log p\big(y \mid m + J\theta\big) + \tfrac12\,\theta^\top P_0\theta ,

with gradient :math:`g = P_0\theta - J^\top\nabla_f\log p` and Hessian :math:`A = P_0 + J^\top\Lambda(f)J`.
At a MAP of the network under the same prior, :math:`\hat\theta` is that mode (:math:`g = 0`); a network
trained with another regularizer, early-stopped, or with batch statistics is not at it.

:class:`LinearizedMode` finds the mode by Newton's method, :math:`\theta \leftarrow \theta - tA^{-1}g`
with a backtracking (Armijo) step :math:`t`. This is Rasmussen & Williams' Algorithm 3.1 written in
weight space: :math:`f = m + J\theta` moves along :math:`-tJA^{-1}g`, which is their function-space
step :math:`f \leftarrow (K^{-1} + \Lambda)^{-1}(\Lambda f + \nabla\log p)` with the NTK prior
:math:`K = JP_0^{-1}J^\top` and the mean :math:`m`. The Jacobian :math:`J` does not move, only
:math:`\Lambda(f)` does. An exact Laplace solver (kernel space by Woodbury on :math:`I + B^\top KB`, weight
space by the Cholesky factor of :math:`A`) costs a GGN or per-group Gram sandwiches and a factorization, so
in weight space (a GGN over every training point's Jacobian) one is built only at the mode of each prior
precision (the evidence and the posterior need it there), and the Newton steps in between are solved by
conjugate gradients with :math:`A(f)` (one jvp and one vjp per iteration), preconditioned by the last solver
built (:mod:`ntkgp.solvers.ggn_precision`); a step whose CG does not converge builds its own solver. Kernel
space caches the per-group Grams and builds a solver per step (a sandwich and a factorization). It stops
when half the squared Newton decrement :math:`\tfrac12 g^\top A^{-1}g` (the predicted decrease of
:math:`\Psi`, in nats) is below ``tolerance``. Results are cached per prior precision and each solve starts
from the last mode.

At the mode :math:`\tilde\theta`, :math:`\tilde f = m + J\tilde\theta`, the Laplace evidence is

.. math::
    \mathcal L(\delta) = \log p(y\mid\tilde f) - \tfrac12\tilde\theta^\top P_0\tilde\theta
      - \tfrac12\log|I + \tilde B^\top K\tilde B| ,

and its gradient in :math:`\delta_g` has, besides the explicit terms, the implicit one through
:math:`\tilde\Lambda = \Lambda(\tilde f)` (the envelope theorem removes the others):
:math:`-\sum_{i\in g} w_i\tilde\theta_i` with :math:`w = A^{-1}J^\top u`,
:math:`u_n = -\tfrac12\,\partial_{f_n}\operatorname{tr}(V_n\Lambda_n(f_n))` and :math:`V_n = J_nA^{-1}J_n^\top`
the posterior covariance blocks at the training points (Rasmussen & Williams eq. 5.23). Kernel space takes
:math:`\sum_{i\in g} w_i\tilde\theta_i` from the cached per-group Grams in float64, with no network pass
(:meth:`LinearizedMode._implicit_sums`): through the Woodbury form's :math:`J^\top` and :math:`J` a float32
network's round-off reached the gradient at 2e-4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ntkgp.linalg.hessian_root import apply_root, apply_root_transpose
from ntkgp.memory import KERNEL_SPACE_MATRICES, WEIGHT_SPACE_MATRICES, check_fits
from ntkgp.ntk import NTKProblem, gram, pullback, pushforward
from ntkgp.posteriors.base import Posterior
from ntkgp.solvers.ggn_precision import ggn_precision_solve
from ntkgp.solvers.laplace import KernelSpaceLaplaceSolver, WeightSpaceLaplaceSolver

__all__ = ["LinearizedMode", "ModeState"]

#: ``mode='auto'`` takes the linearized model's mode when half the squared Newton decrement at
#: the network's weights exceeds this (nats)
AUTO_DECREMENT = 1e-2
#: below this relative decrement a Newton step that gains less than 10x counts as stalled at round-off
_ROUNDOFF = 1e-8
#: a predicted decrease below this relative change of the objective is not resolved by its float64 value
_VALUE_ROUNDOFF = 1e-13


@dataclass
class ModeState:
    r"""The linearized model at its posterior mode for one prior precision.

    Attributes
    ----------
    delta:
        :math:`\delta` ``(G,)``, float64.
    theta:
        :math:`\tilde\theta` ``(P,)``, float64.
    f:
        :math:`\tilde f = m(X) + J\tilde\theta` ``(N, C)``, float64.
    solver:
        The exact Laplace solver at :math:`\Lambda(\tilde f)`.
    log_likelihood:
        :math:`\log p(y \mid \tilde f)` (a 0-d tensor).
    iterations:
        Newton steps taken from the warm start.
    decrement:
        Half the squared Newton decrement at :math:`\tilde\theta` (nats): how far from the mode it is.
    converged:
        Whether ``decrement`` fell below the tolerance within the iteration limit.
    """

    delta: Tensor
    theta: Tensor
    f: Tensor
    solver: KernelSpaceLaplaceSolver | WeightSpaceLaplaceSolver
    log_likelihood: Tensor
    iterations: int
    decrement: float
    converged: bool


class LinearizedMode:
    """Newton's method for the linearized model's posterior mode, per prior precision, warm-started and cached.

    Parameters
    ----------
    problem:
        The training problem (network, prior layout, inputs).
    log_likelihood:
        ``f (N, C) -> log p(y | f)``, differentiable in ``f`` (with a process group: ``f`` this rank's rows,
        the value summed over ranks).
    hessian_root:
        ``f (N, C) -> B (N, C, C)`` with :math:`BB^\\top = -\\nabla^2_f\\log p`, differentiable in ``f``.
    space:
        ``"kernel"`` or ``"weight"``: which exact Laplace solver to build at each iterate.
    tolerance:
        Stop when half the squared Newton decrement is below this (nats).
    max_iter:
        Newton steps at most per solve.
    cg_max_iterations:
        Conjugate-gradient iterations at most for a Newton step away from the last solver built; past them an
        exact solver is built at that iterate.
    """

    def __init__(
        self,
        problem: NTKProblem,
        log_likelihood: Callable[[Tensor], Tensor],
        hessian_root: Callable[[Tensor], Tensor],
        space: str,
        *,
        tolerance: float = 1e-20,
        max_iter: int = 50,
        cg_max_iterations: int = 30,
    ) -> None:
        if space not in ("kernel", "weight"):
            raise ValueError(f"space must be 'kernel' or 'weight', got {space!r}")
        self.problem, self.space = problem, space
        self.log_likelihood, self.hessian_root = log_likelihood, hessian_root
        self.tolerance, self.max_iter = tolerance, max_iter
        network = problem.network
        #: the network's outputs :math:`\hat f` on the training inputs, ``(N, C)``, float64
        self.f_hat = network.forward(problem.x).to(torch.float64)
        #: the network's weights :math:`\hat\theta`, ``(P,)``, float64
        self.theta_hat = network.flat_params.to(torch.float64)
        self._grams: Tensor | None = None
        self._states: list[ModeState] = []
        self._warm: tuple[Tensor, Tensor] = (self.theta_hat, self.f_hat)
        #: an exact Laplace solver already built at :math:`\Lambda(\hat f)` (the first iterate's), if any
        self.initial_solver: KernelSpaceLaplaceSolver | WeightSpaceLaplaceSolver | None = None
        #: the last exact solver built and the iterate ``f`` it is at: it preconditions the Newton steps elsewhere
        self._reference: tuple[KernelSpaceLaplaceSolver | WeightSpaceLaplaceSolver, Tensor] | None = None
        #: CG's relative residual for the Newton steps (above the network dtype's round-off) and its iterations
        eps = torch.finfo(network.dtype).eps
        self.cg_tolerance, self.cg_max_iterations = min(1e-3, max(1e-10, 100 * eps)), cg_max_iterations
        #: exact solvers built (the GGN or Grams and a factorization each) and CG iterations run, over all solves
        self.solvers_built, self.cg_iterations = 0, 0

    def forget_modes(self, *, keep_warm_start: bool = False) -> None:
        r"""Drop the cached modes, so the next :meth:`state` solves again: from the last mode found if
        ``keep_warm_start``, else from the network's weights :math:`\hat\theta` (a cold start)."""
        self._states = []
        if not keep_warm_start:
            self._warm = (self.theta_hat, self.f_hat)

    # ------------------------------------------------------------ pieces
    def solver_at(self, f: Tensor) -> KernelSpaceLaplaceSolver | WeightSpaceLaplaceSolver:
        r"""The exact Laplace solver with :math:`\Lambda(f)`, ``f`` ``(N, C)``."""
        root = self.hessian_root(f.detach())
        self.solvers_built += 1
        if self.space == "weight":
            return WeightSpaceLaplaceSolver(self.problem, root, check_memory=False)  # checked once: check_memory()
        if self._grams is None:  # the per-group K_g do not depend on f: computed once
            self._grams = gram(self.problem.ntk, self.problem.x)
        return KernelSpaceLaplaceSolver(self.problem, root, grams=self._grams, check_memory=False)

    def check_memory(self) -> None:
        """Raise :class:`~ntkgp.errors.KernelTooLargeError`, once, when the first solve starts, if what the Newton
        solves hold besides the solver at the network's outputs does not fit in free memory: up to two more
        solvers (the two cached modes' and the preconditioner's; three without a given first solver), the
        per-group Grams in kernel space, and one evaluation's working matrices.

        The solvers built later are not checked again: free memory read then would count what this finder
        already holds against it, and refuse a solve midway that fits."""
        problem, device = self.problem, self.problem.network.device
        if self.space == "weight":
            side, working, grams = problem.network.num_parameters, WEIGHT_SPACE_MATRICES, 0
            held = WeightSpaceLaplaceSolver.held_bytes(problem)
        else:
            side, working = problem.size, KERNEL_SPACE_MATRICES
            grams = 0 if self._grams is not None else 8 * problem.layout.num_groups * side**2
            held = KernelSpaceLaplaceSolver.held_bytes(problem)
        solvers = 2 if self.initial_solver is not None else 3
        check_fits(
            solvers * held + grams + 8 * working * side**2 + problem.budget,
            f"the linearized model's mode in {self.space} space ({solvers} more solvers of {held / 2**20:.0f} MiB, "
            f"the Grams and {working} working matrices of {side} x {side})",
            device,
        )

    def _objective(self, theta: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        prior = self.problem.layout.expand(delta)
        return -self.log_likelihood(f) + 0.5 * (prior * theta.square()).sum()

    def gradient(self, theta: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        r""":math:`g = P_0\theta - J^\top\nabla_f\log p(y\mid f)`, ``(P,)``, float64 (one vjp pass)."""
        f = f.detach().requires_grad_(True)
        with torch.enable_grad():
            (score,) = torch.autograd.grad(self.log_likelihood(f), f)
        pulled = self.problem.sharding.sum(pullback(self.problem.ntk, self.problem.x, score.unsqueeze(0)))[0]
        return self.problem.layout.expand(delta) * theta - pulled

    def push(self, v: Tensor) -> Tensor:
        r""":math:`Jv` on the training inputs, ``(P,)`` -> ``(N, C)``, float64."""
        return pushforward(self.problem.ntk, self.problem.x, v.unsqueeze(0))[0].to(torch.float64)

    # ------------------------------------------------------------ the mode
    @torch.no_grad()
    def state(self, delta: Tensor) -> ModeState:
        r"""The mode at prior precisions ``delta`` ``(G,)``: cached, else Newton from the last mode.

        Newton steps at an iterate without a solver of its own are solved by conjugate gradients preconditioned
        with the last solver built (:mod:`ntkgp.solvers.ggn_precision`); a solver is built only where that does
        not converge, and once at the mode (for the evidence and the posterior there)."""
        delta = delta.detach().to(torch.float64)
        for s in self._states:
            if torch.equal(s.delta, delta):
                return s
        theta, f = self._warm
        if self._reference is None:  # the first solve starts at the network's outputs
            self.check_memory()
            built = self.initial_solver if self.initial_solver is not None else self.solver_at(f)
            self._reference = (built, f)
        value = self._objective(theta, f, delta)
        steps, converged, half, previous = 0, False, float("inf"), float("inf")
        for _ in range(self.max_iter + 1):
            g = self.gradient(theta, f, delta)
            step = self._newton_step(f, delta, g)
            half, scale = 0.5 * float(g @ step), max(1.0, abs(float(value)))
            # converged; or stalled at round-off (a float32 network's products), where Newton stops gaining
            converged = half <= self.tolerance * scale or (half <= _ROUNDOFF * scale and half > 0.1 * previous)
            if converged or steps == self.max_iter:
                break
            previous = half
            theta, f, value = self._line_search(theta, f, value, step, g, delta)
            steps += 1
        assert self._reference is not None
        solver, at = self._reference
        if at is not f:  # the evidence and the posterior need the exact solver at the mode
            solver = self.solver_at(f)
            self._reference = (solver, f)
        state = ModeState(delta, theta, f, solver, self.log_likelihood(f), steps, half, converged)
        self._states = [state] + self._states[:1]
        self._warm = (theta, f)
        return state

    def _newton_step(self, f: Tensor, delta: Tensor, g: Tensor) -> Tensor:
        r""":math:`A(f)^{-1}g` ``(P,)``: with the last solver built if it is at ``f``; else, in weight space, by CG
        preconditioned with it; else (kernel space, or CG short of its tolerance) with a solver built at ``f``,
        kept as the reference.

        Kernel space rebuilds at each step: its per-group Grams are cached (no network pass), a build is one
        sandwich and one Cholesky factor, and a CG iteration there costs four network passes (the matvec and the
        Woodbury preconditioner); measured on the CNN of ``benchmarks/calibration_tasks.py`` at N = 200
        (M = 2,000, 2-core CPU), CG made an evidence evaluation 2-3x slower. A weight-space build forms the
        Jacobian of every training point and an ``N C P^2`` GGN: at N = 600 (P = 6,186) it took 22 s, against
        about 0.5 s per CG iteration."""
        assert self._reference is not None  # set by state() before any step
        solver, at = self._reference
        if at is not f and self.space == "weight":
            root = self.hessian_root(f.detach())
            result = ggn_precision_solve(
                self.problem,
                root,
                delta,
                g.unsqueeze(-1),
                solver,
                tolerance=self.cg_tolerance,
                max_iterations=self.cg_max_iterations,
            )
            self.cg_iterations += int(result.iterations.max())
            if result.converged:
                return result.solution[:, 0]
        if at is not f:
            solver = self.solver_at(f)
            self._reference = (solver, f)
        return solver.precision_solve(delta, g.unsqueeze(-1))[:, 0]

    def _line_search(
        self, theta: Tensor, f: Tensor, value: Tensor, step: Tensor, g: Tensor, delta: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Backtracking along the Newton step (``f`` is linear in ``theta``: one jvp for every trial).

        The full step is taken when its predicted decrease is below the objective's round-off: there the
        Armijo test compares round-off, and the convex objective's Newton step is the right one."""
        moved = self.push(step)
        slope = float(g @ step)
        t = 1.0
        resolvable = slope > _VALUE_ROUNDOFF * max(1.0, abs(float(value)))
        for _ in range(30):
            new_theta, new_f = theta - t * step, f - t * moved
            new_value = self._objective(new_theta, new_f, delta)
            if not resolvable or float(new_value) <= float(value) - 1e-4 * t * slope or t < 1e-8:
                return new_theta, new_f, new_value
            t *= 0.5
        return theta - t * step, f - t * moved, self._objective(theta - t * step, f - t * moved, delta)

    def is_away_from(self, delta: Tensor, solver: KernelSpaceLaplaceSolver | WeightSpaceLaplaceSolver) -> bool:
        r"""Whether :math:`\hat\theta` is not the mode at ``delta`` (the stated prior): half the squared Newton
        decrement there exceeds :data:`AUTO_DECREMENT` nats. ``solver`` (at :math:`\Lambda(\hat f)`) becomes the
        first iterate's."""
        self.initial_solver = solver
        return self.map_decrement(delta, solver) > AUTO_DECREMENT

    def map_decrement(self, delta: Tensor, solver: KernelSpaceLaplaceSolver | WeightSpaceLaplaceSolver) -> float:
        r"""Half the squared Newton decrement at :math:`\hat\theta` (nats); ``solver`` is at :math:`\Lambda(\hat f)`."""
        with torch.no_grad():
            delta = delta.detach().to(torch.float64)
            g = self.gradient(self.theta_hat, self.f_hat, delta)
            return 0.5 * float(g @ solver.precision_solve(delta, g.unsqueeze(-1))[:, 0])

    # ------------------------------------------------------------ evidence and posterior at the mode
    def log_evidence(self, delta: Tensor) -> Tensor:
        r"""The Laplace evidence at the mode, differentiable in ``delta`` (explicit and implicit terms)."""
        s = self.state(delta)
        layout = self.problem.layout
        d64 = delta.to(torch.float64)
        evidence = (
            s.log_likelihood - 0.5 * (layout.expand(d64) * s.theta.square()).sum() - 0.5 * s.solver.log_det(delta)
        )
        if not (torch.is_grad_enabled() and delta.requires_grad):
            return evidence
        implicit = -(d64 * self._implicit_sums(s)).sum()
        return evidence + (implicit - implicit.detach())

    def _implicit_sums(self, s: ModeState) -> Tensor:
        r""":math:`\sum_{i\in g} w_i\tilde\theta_i` per group ``(G,)``, float64, with :math:`w = A^{-1}J^\top u` and
        :math:`u = -\tfrac12\partial_f\operatorname{tr}(V\Lambda(f))`.

        Weight space: :math:`w` by the cached factor of :math:`A`. Kernel space: from the cached per-group Grams
        alone, with no network pass. At the mode :math:`P_0\tilde\theta = J^\top\tilde s`
        (:math:`\tilde s = \nabla_f\log p(y\mid\tilde f)`) and, by Woodbury, :math:`w = P_0^{-1}J^\top r` with
        :math:`r = u - B(I + B^\top KB)^{-1}B^\top Ku`, so the sum is :math:`r^\top K_g\tilde s/\delta_g^2`: float64
        products of float64 matrices. Through :math:`J^\top` and :math:`J` (a float32 network's passes) the
        Woodbury difference loses the network dtype's precision relative to :math:`|P_0^{-1}J^\top u|`: measured
        on a float32 BatchNorm CNN (N = 200, P = 690), a 2e-4 error in the gradient in :math:`\log\delta` (against
        1e-6 here), above ``fit_hyperparameters``' default tolerance of 1e-4."""
        with torch.no_grad():
            blocks = s.solver.laplace_posterior(s.delta, s.theta).covariance_blocks(self.problem.x)  # (N, C, C)
        f = s.f.detach().requires_grad_(True)
        with torch.enable_grad():
            root = self.hessian_root(f)
            trace = torch.einsum("nij,nik,njk->", blocks, root, root)  # sum_n tr(V_n B_n B_n^T)
            (u,) = torch.autograd.grad(-0.5 * trace, f)
        with torch.no_grad():
            if isinstance(s.solver, KernelSpaceLaplaceSolver):
                return self._kernel_implicit_sums(s, u.reshape(-1, 1).to(torch.float64))
            pulled = self.problem.sharding.sum(pullback(self.problem.ntk, self.problem.x, u.unsqueeze(0)))[0]
            w = s.solver.precision_solve(s.delta, pulled.unsqueeze(-1))[:, 0]
            return self.problem.layout.group_sums(w * s.theta)

    def _kernel_implicit_sums(self, s: ModeState, u: Tensor) -> Tensor:
        r""":math:`r^\top K_g\tilde s/\delta_g^2` per group (see :meth:`_implicit_sums`); ``u`` ``(NC, 1)``."""
        assert isinstance(s.solver, KernelSpaceLaplaceSolver) and self._grams is not None
        solver, grams, inv = s.solver, self._grams, s.delta.reciprocal()
        f = s.f.detach().requires_grad_(True)
        with torch.enable_grad():
            (score,) = torch.autograd.grad(self.log_likelihood(f), f)
        score = score.reshape(-1).to(torch.float64)
        ku = self.problem.layout.weighted(inv, grams) @ u  # K u, (M, 1)
        root = solver.hessian_root
        r = u - apply_root(root, solver.inner_solve(s.delta, apply_root_transpose(root, ku)))
        return torch.einsum("m,gmk,k->g", score, grams, r[:, 0]) * inv.square()

    def posterior(self, delta: Tensor) -> Posterior:
        """The Laplace posterior at the mode: mean :math:`m + J_*\\tilde\\theta`, with :math:`\\Lambda(\\tilde f)`."""
        s = self.state(delta)
        return s.solver.laplace_posterior(s.delta, s.theta)
