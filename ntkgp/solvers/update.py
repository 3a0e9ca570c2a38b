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
  nothing ``M x M`` is copied, which on a memory-bound CPU costs more than the solve;
* **weight space** the precision by a low-rank term,
  :math:`A' = A + UU^\top`, :math:`U = J_{new}^\top S_{new}^{-1/2}` ``(P, kC)``: a rank-``kC``
  update of its Cholesky factor in :math:`O(P^2 (kC + b))` (:func:`cholesky_update`),
  :math:`J^\top J` by the new rows' outer products and the posterior weights' right-hand side
  :math:`J^\top S^{-1} r` by the new rows' terms, instead of passes over all ``N`` points and a
  :math:`P^3/3` factorization.

Both are exact: the results equal a rebuilt solver's to round-off. The factor is updated only when
the cached one was computed at the same hyperparameters; otherwise the extended solver factors
afresh on first use (still without recomputing its Grams or :math:`J^\top J`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.bordered import BorderedCholesky, factor_logdet, factor_solve, lower_solve
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

__all__ = ["ExtendedKernelSpaceSolver", "cholesky_update", "extend_kernel_solver", "extend_weight_solver"]

#: columns per panel of :func:`cholesky_update` (at least the update's rank)
_PANEL = 32


def cholesky_update(factor: Tensor, update: Tensor, *, panel: int = _PANEL) -> Tensor:
    r"""Lower factor of :math:`LL^\top + UU^\top` from ``factor`` :math:`L` ``(P, P)`` and ``update`` :math:`U`
    ``(P, k)``.

    Blocked, left to right over panels ``j`` of columns, with :math:`W = L_{jj}^{-1}U_j`:

    .. math::
        L'_{jj} = L_{jj} M,\ MM^\top = I + WW^\top;\qquad
        L'_{bj} = (L_{bj} + U_b W^\top) M^{-\top};\qquad
        U_b \leftarrow (U_b - L_{bj} W) R^{-1},\ R^\top R = I + W^\top W,

    where ``b`` are the rows below the panel. The last step rotates the update's columns so that
    the panel's part of :math:`[L\ U]` is :math:`[L'_{jj}\ 0]` (an orthogonal transformation of
    :math:`[L\ U]`, whose Gram it keeps). :math:`O(P^2 (k + \text{panel}))` flops, no :math:`P^3` term.
    """
    P, k = update.shape
    out = factor.clone()
    u = update.clone()
    width = max(panel, k)
    eye_k = torch.eye(k, dtype=factor.dtype, device=factor.device)
    eye_panel = torch.eye(width, dtype=factor.dtype, device=factor.device)
    for s in range(0, P, width):
        e = min(s + width, P)
        ljj, uj = out[s:e, s:e], u[s:e]
        w = torch.linalg.solve_triangular(ljj, uj, upper=False)  # shape: (nb, k)
        m = torch.linalg.cholesky(eye_panel[: e - s, : e - s] + w @ w.mT)
        lbj, ub = out[e:, s:e], u[e:]
        new_lbj = torch.linalg.solve_triangular(m, (lbj + ub @ w.mT).mT, upper=False).mT
        r = torch.linalg.cholesky(eye_k + w.mT @ w)  # lower: R = r^T
        u[e:] = torch.linalg.solve_triangular(r, (ub - lbj @ w).mT, upper=False).mT
        out[s:e, s:e] = ljj @ m
        out[e:, s:e] = new_lbj
    return out


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
        alpha = factor_solve(self.bordered, residual.to(torch.float64).reshape(-1, 1))
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
        captures_train = captures(ntk, problem.x) if captures_train is None else captures_train
        new_caps = captures(ntk, x_new)
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


def extend_weight_solver(solver: WeightSpaceSolver, x_new: Inputs, delta: Tensor, noise_c: Tensor) -> WeightSpaceSolver:
    r"""The weight-space solver of ``solver``'s problem plus the points ``x_new``.

    ``delta`` ``(G,)`` and ``noise_c`` ``(C,)`` are the current hyperparameters: if ``solver``'s cached
    factor is theirs, the new solver's is its rank-``kC`` update (:func:`cholesky_update`).
    """
    problem, ntk, network = solver.problem, solver.ntk, solver.network
    P, C = network.num_parameters, problem.num_outputs
    jac = torch.cat([jacobian(ntk, xc) for _, xc in x_new.chunks(network.chunk_size())]).to(torch.float64)
    if solver.outer.shape[0] == 1:  # one new (P, P) matrix, no temporary of that size
        flat = jac.reshape(-1, P)
        outer = torch.addmm(solver.outer[0], flat.mT, flat).unsqueeze(0)
    else:  # shape: (C, P, k) @ (C, k, P)
        outer = torch.baddbmm(solver.outer, jac.permute(1, 2, 0), jac.permute(1, 0, 2))
    extended = WeightSpaceSolver(problem.on(Inputs.concat([problem.x, x_new])), outer=outer)
    extended.extend_pulled(solver, jac)  # the posterior weights' J^T S^-1 r by the new rows only
    last = solver.last_factor
    delta, noise_c = delta.detach().to(torch.float64), noise_c.detach().to(torch.float64)
    if last is not None and _same(last[0], (delta, noise_c)):
        update = (jac / noise_c.sqrt().reshape(1, C, 1)).reshape(-1, P).mT  # shape: (P, kC)
        extended.seed_factor(cholesky_update(last[1], update), delta, noise_c)
    return extended


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


def _same(old: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> bool:
    return len(old) == len(new) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(old, new))
