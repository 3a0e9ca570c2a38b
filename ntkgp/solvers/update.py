r"""New training points for an exact solver without a rebuild: its caches extended, its factor updated.

Adding ``k`` points (``kC`` rows) to a problem of ``M = NC`` rows changes

* **kernel space** :math:`K + S` by a bordered block. With :math:`LL^\top = A` cached,

  .. math::
      \begin{pmatrix} A & B\\ B^\top & D\end{pmatrix}
      = \begin{pmatrix} L & 0\\ L_{21} & L_{22}\end{pmatrix}
        \begin{pmatrix} L & 0\\ L_{21} & L_{22}\end{pmatrix}^\top,\quad
      L_{21} = (L^{-1}B)^\top,\ L_{22}L_{22}^\top = D - L_{21}L_{21}^\top,

  :math:`O(M^2 kC)` (one triangular solve) and the cross-Grams :math:`K(X, X_{new})`, instead of
  the :math:`M^3/3` Cholesky and the :math:`M^2` Gram of a rebuild. Factor and Grams are kept in
  blocks (:class:`~ntkgp.linalg.bordered.BorderedCholesky`, :class:`ExtendedKernelSpaceSolver`):
  nothing ``M x M`` is copied, which on a memory-bound CPU costs more than the solve. The posterior
  keeps :math:`z = L^{-1}r` of its residual, so the next one extends it by the ``kC`` new rows
  (:meth:`~ntkgp.linalg.bordered.BorderedCholesky.solve_lower_from`) and solves once, backwards;
* **weight space** the precision by a low-rank term,
  :math:`A' = A + UU^\top`, :math:`U = J_{new}^\top S_{new}^{-1/2}` ``(P, kC)``, kept apart from the
  cached factor in Woodbury form (:class:`~ntkgp.linalg.woodbury.WoodburyFactor`: one triangular
  solve :math:`W = L^{-1}U` with ``kC`` right-hand sides, :math:`O(P^2 kC)`, nothing ``P x P``
  allocated), the new rows of :math:`J^\top J` kept apart too (:class:`ExtendedWeightSpaceSolver`)
  and the posterior weights' right-hand side :math:`J^\top S^{-1} r` extended by the new rows'
  terms, instead of passes over all ``N`` points and a :math:`P^3/3` factorization. Every consumer
  of the factor takes it through :mod:`ntkgp.linalg.factor`; :math:`J^\top J` (one new ``P x P``
  matrix) and a dense factor (a rank-``kC`` update,
  :func:`~ntkgp.linalg.cholesky_update.cholesky_update`) are made only when something needs them:
  other hyperparameters, gradients.

Both are exact: the results equal a rebuilt solver's to round-off. The factor is updated only when
the cached one was computed at the same hyperparameters; otherwise the extended solver factors
afresh on first use (still without recomputing its Grams or :math:`J^\top J`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ntkgp.linalg.bordered import BorderedCholesky
from ntkgp.linalg.factor import AnyFactor, factor_logdet, factor_solve, lower_solve, upper_solve
from ntkgp.linalg.woodbury import WoodburyFactor
from ntkgp.memory import check_fits
from ntkgp.network.inputs import Inputs
from ntkgp.ntk import NTKProblem, captures, gram, jacobian
from ntkgp.ntk.captures import capture_bytes, captures_fit
from ntkgp.posteriors.bordered import BorderedKernelSpacePosterior
from ntkgp.posteriors.kernel_space import KernelSpacePosterior
from ntkgp.solvers.base import GaussianSolver, needs_grad
from ntkgp.solvers.kernel_space import KernelSpaceSolver
from ntkgp.solvers.weight_space import WeightSpaceSolver
from ntkgp.structured.capture import UnitCapture

__all__ = ["ExtendedKernelSpaceSolver", "ExtendedWeightSpaceSolver", "extend_kernel_solver", "extend_weight_solver"]


class ExtendedKernelSpaceSolver(KernelSpaceSolver):
    """A kernel-space solver with points appended: its Grams and factor held in blocks.

    At the hyperparameters it was extended at (``key``) the posterior, solves and the evidence use
    the bordered factor; the bordered Grams ``(G, M', M')`` are assembled only when something
    needs them (other hyperparameters, gradients), and then the dense factor too, never refactored
    at ``key``. Everything else is :class:`~ntkgp.solvers.kernel_space.KernelSpaceSolver`'s.
    """

    def __init__(
        self,
        problem: NTKProblem,
        base: KernelSpaceSolver,
        cross: Tensor,
        block: Tensor,
        key: tuple[Tensor, Tensor],
        factor: BorderedCholesky | None,
    ) -> None:
        GaussianSolver.__init__(self, problem)
        M, G = self.size, self.layout.num_groups
        check_fits(
            8 * (G + 2) * M * M, f"the kernel-space solver ({G} Gram matrices of {M} x {M})", self.network.device
        )
        self._base, self._cross, self._block = base, cross, block
        self._grams: Tensor | None = None
        self._spectrum: tuple[Tensor, Tensor] | None = None
        self._whitened: tuple[tuple[Tensor, Tensor], Tensor, Tensor] | None = None
        #: the hyperparameters ``(delta, noise)`` of :attr:`bordered`
        self.key = key
        #: the bordered factor of :math:`K + S` at :attr:`key` (``None`` if the base had none there)
        self.bordered = factor

    @property
    def grams(self) -> Tensor:  # type: ignore[override]
        """Per-group Grams ``(G, M', M')``, assembled from the blocks on first access."""
        if self._grams is None:
            old, m = self._base.grams, self._base.size
            size = self.size
            grams = old.new_empty(old.shape[0], size, size)
            grams[:, :m, :m] = old
            grams[:, :m, m:] = self._cross
            grams[:, m:, :m] = self._cross.mT
            grams[:, m:, m:] = self._block
            self._grams = grams
        return self._grams

    def _at_key(self, delta: Tensor, noise: Tensor) -> bool:
        return self.bordered is not None and _same(self.key, (delta.detach(), noise.detach()))

    def factor(self, delta: Tensor, noise: Tensor) -> Tensor:
        if self._at_key(delta, noise) and self.last_factor is None:
            assert self.bordered is not None
            self.seed_factor(self.bordered.dense(), *self.key)  # the dense factor, not a new factorization
        return super().factor(delta, noise)

    def inv_quad_logdet(self, delta: Tensor, noise: Tensor, rhs: Tensor | None, logdet: bool) -> tuple[Tensor, Tensor]:
        if self._at_key(delta, noise) and not needs_grad(delta, noise, *([] if rhs is None else [rhs])):
            assert self.bordered is not None
            zero = torch.zeros((), dtype=torch.float64, device=self.network.device)
            quad = zero if rhs is None else lower_solve(self.bordered, rhs.to(torch.float64)).square().sum(-2)
            return quad, factor_logdet(self.bordered) if logdet else zero
        self.factor(delta, noise)  # seeds the dense factor at the key
        return super().inv_quad_logdet(delta, noise, rhs, logdet)

    def solve(self, delta: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
        if self._at_key(delta, noise) and not needs_grad(delta, noise, rhs):
            assert self.bordered is not None
            return factor_solve(self.bordered, rhs.to(torch.float64))
        return super().solve(delta, noise, rhs)

    @torch.no_grad()
    def posterior(self, delta: Tensor, noise: Tensor, residual: Tensor) -> KernelSpacePosterior:
        if not self._at_key(delta, noise):
            return super().posterior(delta, noise, residual)
        assert self.bordered is not None
        r, m = residual.to(torch.float64).reshape(-1, 1), self._base.size
        top = self._base.whitened_residual(self.key[0], self.key[1][:m], r[:m])  # L^{-1} r of the old rows
        z = lower_solve(self.bordered, r) if top is None else self.bordered.solve_lower_from(top, r)
        self.keep_whitened(*self.key, r, z)
        alpha = upper_solve(self.bordered, z)  # one solve over all rows, backwards
        weights = self.posterior_weights(self.key[0], alpha[:, 0])
        return BorderedKernelSpacePosterior(self.problem, self.key[0], self.bordered, weights)


def _factor_at(solver: KernelSpaceSolver, delta: Tensor, noise: Tensor) -> Tensor | BorderedCholesky | None:
    """``solver``'s factor of :math:`K + S` at these hyperparameters, if it holds one (no new factorization)."""
    if isinstance(solver, ExtendedKernelSpaceSolver) and solver.bordered is not None:
        if _same(solver.key, (delta, noise)):
            return solver.bordered
    last = solver.last_factor
    return last[1] if last is not None and _same(last[0], (delta, noise)) else None


def extend_kernel_solver(
    solver: KernelSpaceSolver,
    x_new: Inputs,
    delta: Tensor,
    noise: Tensor,
    captures_train: list | None = None,
) -> ExtendedKernelSpaceSolver:
    """The kernel-space solver of ``solver``'s problem plus the points ``x_new``, by blocks.

    ``delta`` ``(G,)`` and ``noise`` ``(M + kC,)`` are the current hyperparameters (the noise over all
    points, new ones last): if ``solver`` holds its factor at them, the new solver's factor is its
    bordered extension (:class:`~ntkgp.linalg.bordered.BorderedCholesky`). Costs the cross-Grams
    :math:`K(X, X_{new})` and one triangular solve with ``kC`` right-hand sides; nothing ``M x M`` is
    copied. ``captures_train`` are the training inputs' captures when the caller holds them.
    """
    problem, ntk = solver.problem, solver.ntk
    M = solver.size
    x_all = Inputs.concat([problem.x, x_new])
    new_caps = None
    if ntk.plan().units and (captures_train is not None or captures_fit(ntk, problem.x, ntk.budget // 2)):
        if captures_train is None:  # the cache holds them after an earlier update (no pass over the old points)
            captures_train = ntk.captures.get(problem.x) or captures(ntk, problem.x)
        new_caps = ntk.captures.get(x_new) or captures(ntk, x_new)  # kept by the training mean's update
        if capture_bytes(ntk, x_all) <= ntk.budget // 2:  # the posterior's cross-kernel will want them
            joined = [
                UnitCapture(_cat(a.inputs, b.inputs), torch.cat([a.cotangents, b.cotangents]))
                for a, b in zip(captures_train, new_caps)
            ]
            ntk.captures.put(x_all, joined)
    else:  # captures beyond the budget: the Grams take them in tiles
        captures_train = None
    cross = gram(ntk, problem.x, x_new, captures1=captures_train, captures2=new_caps)  # shape: (G, M, kC)
    block = gram(ntk, x_new, captures1=new_caps)  # shape: (G, kC, kC)
    delta, noise = delta.detach().to(torch.float64), noise.detach().to(torch.float64)
    base = _factor_at(solver, delta, noise[:M])
    factor = None
    if base is not None:
        weights = delta.reciprocal()
        border = solver.layout.weighted(weights, block)
        border.diagonal().add_(noise[M:])
        what = "the new points' kernel plus noise"
        factor = BorderedCholesky.extend(base, solver.layout.weighted(weights, cross), border, what=what)
    return ExtendedKernelSpaceSolver(problem.on(x_all), solver, cross, block, (delta.clone(), noise.clone()), factor)


class ExtendedWeightSpaceSolver(WeightSpaceSolver):
    r"""A weight-space solver with points appended: :math:`J^\top J` and the precision's factor with the new rows
    kept apart.

    :math:`J^\top J` is the base's dense matrix plus the appended rows' outer products, assembled (one new
    ``(C, P, P)`` tensor) only when something needs it: other hyperparameters, gradients, the spectrum.
    At the hyperparameters it was extended at (``key``) the posterior, solves and the evidence without
    gradients use the :class:`~ntkgp.linalg.woodbury.WoodburyFactor`; with gradients there, the dense
    factor is its rank-``kC`` update (:meth:`~ntkgp.linalg.woodbury.WoodburyFactor.dense`), not a new
    factorization. Everything else is :class:`~ntkgp.solvers.weight_space.WeightSpaceSolver`'s.

    Parameters
    ----------
    problem:
        The training problem (all points, the added ones last).
    outer:
        :math:`J^\top J` of the points before the appended ones, ``(C, P, P)`` (shared, never modified).
    rows:
        The appended points' Jacobian ``(k, C, P)``, float64.
    key:
        The hyperparameters ``(delta, noise_c)`` of ``factor``.
    factor:
        The factor of the precision at ``key`` (``None`` if the base had none there).
    """

    def __init__(
        self,
        problem: NTKProblem,
        outer: Tensor,
        rows: Tensor,
        key: tuple[Tensor, Tensor],
        factor: WoodburyFactor | None,
    ) -> None:
        super().__init__(problem, outer=outer)
        self._rows = rows
        self._assembled: Tensor | None = None
        #: the hyperparameters ``(delta, noise_c)`` of :attr:`woodbury`
        self.key = key
        #: the factor of the precision at :attr:`key` (``None`` if the base had none there)
        self.woodbury = factor

    @property
    def outer(self) -> Tensor:
        r""":math:`J^\top J` per output, ``(C, P, P)``: the base's plus the appended rows', made on first access."""
        if self._assembled is None:
            base, rows, P = self._outer, self._rows, self._outer.shape[-1]
            if base.shape[0] == 1:  # one new (P, P) matrix, no temporary of that size
                flat = rows.reshape(-1, P)
                self._assembled = torch.addmm(base[0], flat.mT, flat).unsqueeze(0)
            else:  # shape: (C, P, k) @ (C, k, P)
                self._assembled = torch.baddbmm(base, rows.permute(1, 2, 0), rows.permute(1, 0, 2))
        return self._assembled

    def outer_parts(self) -> tuple[Tensor, Tensor | None]:
        if self._assembled is not None:
            return self._assembled, None
        return self._outer, self._rows

    def _at_key(self, delta: Tensor, noise_c: Tensor) -> bool:
        return self.woodbury is not None and _same(self.key, (delta.detach(), noise_c.detach()))

    def _factor(self, delta: Tensor, noise_c: Tensor) -> AnyFactor:
        if self.woodbury is not None and self._at_key(delta, noise_c) and not needs_grad(delta, noise_c):
            return self.woodbury
        return super()._factor(delta, noise_c)

    def cached_factor(self, compute: Callable[[], Tensor], *key: Tensor) -> Tensor:
        last = self.last_factor
        if (
            self.woodbury is not None
            and not needs_grad(*key)
            and _same(self.key, tuple(k.detach() for k in key))
            and (last is None or not _same(last[0], self.key))
        ):
            self.seed_factor(self.woodbury.dense(), *self.key)  # a rank-kC update, not a new factorization
        return super().cached_factor(compute, *key)


def extend_weight_solver(solver: WeightSpaceSolver, x_new: Inputs, delta: Tensor, noise_c: Tensor) -> WeightSpaceSolver:
    r"""The weight-space solver of ``solver``'s problem plus the points ``x_new``.

    ``delta`` ``(G,)`` and ``noise_c`` ``(C,)`` are the current hyperparameters: if ``solver`` holds its
    factor at them (dense, or in Woodbury form after an earlier update), the new solver's is that factor
    with the rank-``kC`` term of the new rows kept apart (:meth:`~ntkgp.linalg.woodbury.WoodburyFactor.extend`).
    Costs the new points' Jacobian and one triangular solve with ``kC`` right-hand sides: nothing ``P x P``
    is allocated and no pass over the old points is made.
    """
    problem, ntk, network = solver.problem, solver.ntk, solver.network
    P, C = network.num_parameters, problem.num_outputs
    size = network.chunk_size()  # one chunk: x_new itself, whose captures the training mean's update kept
    chunks = [jacobian(ntk, xc) for _, xc in x_new.chunks(size)] if x_new.num > size else [jacobian(ntk, x_new)]
    jac = torch.cat(chunks).to(torch.float64)  # shape: (k, C, P)
    outer, rows = solver.outer_parts()
    rows = jac if rows is None else torch.cat([rows, jac])  # shape: (k, C, P)
    delta, noise_c = delta.detach().to(torch.float64), noise_c.detach().to(torch.float64)
    base = _weight_factor_at(solver, delta, noise_c)
    factor = None
    if base is not None:
        update = (jac / noise_c.sqrt().reshape(1, C, 1)).reshape(-1, P).mT  # shape: (P, kC)
        factor = WoodburyFactor.extend(base, update)
    key = (delta.clone(), noise_c.clone())
    extended = ExtendedWeightSpaceSolver(problem.on(Inputs.concat([problem.x, x_new])), outer, rows, key, factor)
    extended.extend_pulled(solver, jac)  # the posterior weights' J^T S^-1 r by the new rows only
    return extended


def _weight_factor_at(solver: WeightSpaceSolver, delta: Tensor, noise_c: Tensor) -> Tensor | WoodburyFactor | None:
    """``solver``'s factor of the precision at these hyperparameters, if it holds one (no new factorization):
    a dense one if it has one there (the new term then starts on it), else its Woodbury factor."""
    last = solver.last_factor
    if last is not None and _same(last[0], (delta, noise_c)):
        return last[1]
    if isinstance(solver, ExtendedWeightSpaceSolver) and solver.woodbury is not None:
        if _same(solver.key, (delta, noise_c)):
            return solver.woodbury
    return None


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


def _same(old: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> bool:
    return len(old) == len(new) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(old, new))
