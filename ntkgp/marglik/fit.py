r"""Post-hoc fitting of a LinearizedGP's hyperparameters to the optimum of its evidence.

``fit_hyperparameters(model)`` maximizes ``model.log_evidence()`` over the prior precisions
:math:`\delta` (and the Gaussian likelihood's noise), in :math:`\log\delta`:

* ``"spectral"`` (one prior group with an exact solver; Gaussian likelihoods with one noise variance,
  or a Laplace likelihood with ``mode="map"``): one eigendecomposition of the cached Gram
  (kernel space) or of :math:`J^\top J` / :math:`J^\top\Lambda J` (weight space), by the solver's
  ``spectrum()``; then Newton's method on the closed-form evidence (:mod:`ntkgp.marglik.spectral`),
  each step ``O(NC)`` or ``O(P)``;
* ``"lbfgs"`` (every other case: several prior groups, per-output or fixed noise, ``mode="linearized"``,
  approximate solvers): L-BFGS with strong-Wolfe line search on the exact evidence, whose gradient
  comes from the cached factor (and, at the linearized model's mode, includes the implicit term);
* ``"adam"``: ``steps`` Adam steps of learning rate ``lr`` on ``model.parameters()`` (the former default).

Convergence is the norm of the gradient in the fitted variables (:math:`\log\delta`, and the noise's
raw parameter) against ``tolerance``; a :class:`ConvergenceWarning` says when it was not reached.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from gpytorch.likelihoods import GaussianLikelihood
from torch import Tensor

from ntkgp.errors import NotPositiveDefiniteError
from ntkgp.marglik.spectral import (
    gaussian_kernel_evidence,
    gaussian_weight_evidence,
    laplace_evidence,
    newton_maximize,
)

if TYPE_CHECKING:
    from ntkgp.models.linearized_gp import LinearizedGP

__all__ = ["ConvergenceWarning", "HyperparameterFit", "fit_hyperparameters"]

#: L-BFGS runs at most (each restart drops the curvature history)
_RESTARTS = 3


class ConvergenceWarning(UserWarning):
    """The evidence's gradient did not reach the tolerance within the iteration limit."""


@dataclass
class HyperparameterFit:
    """What :func:`fit_hyperparameters` did.

    Attributes
    ----------
    method:
        ``"spectral"``, ``"lbfgs"`` or ``"adam"``.
    log_evidence:
        The log evidence at the fitted hyperparameters.
    gradient_norm:
        Norm of its gradient in the fitted variables (:math:`\\log\\delta`, noise) there.
    converged:
        Whether ``gradient_norm <= tolerance``.
    iterations, evaluations:
        Optimizer iterations, and evidence evaluations (with gradient).
    seconds:
        Wall time, including the eigendecomposition of the spectral route.
    prior_precision:
        The fitted :math:`\\delta` ``(G,)``.
    noise:
        The fitted noise (Gaussian likelihoods), else ``None``.
    curve:
        The log evidence after each iteration.
    """

    method: str
    log_evidence: float
    gradient_norm: float
    converged: bool
    iterations: int
    evaluations: int
    seconds: float
    prior_precision: Tensor
    noise: Tensor | None = None
    curve: list[float] = field(default_factory=list)


def fit_hyperparameters(
    model: LinearizedGP,
    *,
    method: str = "auto",
    tolerance: float = 1e-4,
    max_iter: int = 100,
    steps: int | None = None,
    lr: float | None = None,
) -> HyperparameterFit:
    """Fit the prior precisions (and a Gaussian likelihood's noise) of ``model`` to the optimum of its evidence.

    Parameters
    ----------
    model:
        A :class:`~ntkgp.models.LinearizedGP`; its hyperparameters are set in place and it is left in eval mode.
    method:
        ``"auto"`` (``"spectral"`` where it applies, else ``"lbfgs"``), ``"spectral"``, ``"lbfgs"`` or
        ``"adam"``. Giving ``steps`` or ``lr`` alone selects ``"adam"`` (200 steps, lr 0.1 by default).
    tolerance:
        Gradient norm (nats per unit of :math:`\\log\\delta`) at which to stop; at ``1e-4`` the
        evidence is within about :math:`10^{-8}` nats of its optimum.
    max_iter:
        Newton or L-BFGS iterations at most.

    Returns
    -------
    HyperparameterFit
    """
    if method == "auto" and (steps is not None or lr is not None):
        method = "adam"
    if method not in ("auto", "spectral", "lbfgs", "adam"):
        raise ValueError(f"method must be 'auto', 'spectral', 'lbfgs' or 'adam', got {method!r}")
    started = time.perf_counter()
    spectral = _spectral_problem(model)
    if method == "spectral" and spectral is None:
        raise ValueError(
            "the spectral fit needs one prior group, an exact solver, and a GaussianLikelihood or a Laplace "
            "likelihood with mode='map'; use method='lbfgs'"
        )
    if method == "adam":
        fit = _adam(model, 200 if steps is None else steps, 0.1 if lr is None else lr)
    elif method == "lbfgs" or spectral is None:
        fit = _lbfgs(model, tolerance, max_iter)
    else:
        fit = _spectral(model, spectral, tolerance, max_iter)
    model.eval()
    fit.seconds = time.perf_counter() - started
    fit.converged = fit.gradient_norm <= tolerance
    if not fit.converged and fit.method != "adam":
        warnings.warn(
            f"fit_hyperparameters ({fit.method}) stopped after {fit.iterations} iterations with gradient norm "
            f"{fit.gradient_norm:.3g} > tolerance {tolerance:.3g}",
            ConvergenceWarning,
            stacklevel=2,
        )
    return fit


# ---------------------------------------------------------------- spectral
def _gaussian_noise(model: LinearizedGP) -> tuple[bool, float] | None:
    """``(fit the noise?, its lower bound)`` for a GaussianLikelihood with one noise value, else ``None``."""
    lik = model.likelihood
    if not isinstance(lik, GaussianLikelihood) or lik.noise.numel() != 1:
        return None
    raw = lik.noise_covar.raw_noise
    bound = lik.noise_covar.raw_noise_constraint.lower_bound
    return raw.requires_grad, float(bound.reshape(-1)[0]) if bound.numel() else 0.0


def _spectral_problem(model: LinearizedGP) -> tuple | None:
    """What the spectral route needs, or ``None`` where it does not apply."""
    if model.layout.num_groups != 1:
        return None
    if model.is_laplace:
        return ("laplace",) if model.mode == "map" and model.solver.exact else None
    noise = _gaussian_noise(model)
    if noise is None or model.num_outputs != 1 or not model.solver.exact:
        return None
    return ("gaussian", *noise)


def _spectral(model: LinearizedGP, problem: tuple, tolerance: float, max_iter: int) -> HyperparameterFit:
    solver: Any = model.solver  # an exact solver (checked by _spectral_problem): it has spectrum()
    s0 = float(model.prior_precision.detach().log()[0])
    if problem[0] == "laplace":
        theta_sq = float(model.network.flat_params.to(torch.float64).square().sum())
        fn = laplace_evidence(solver.spectrum(), float(model.map_log_likelihood), theta_sq)
        x0, noise_fit, floor = torch.tensor([s0]), False, 0.0
    else:
        _, noise_fit, floor = problem
        noise = float(model.likelihood.noise.detach().reshape(-1)[0])
        with torch.no_grad():
            r = model.residual().to(torch.float64)
        if solver.name == "kernel":
            values, vectors = solver.spectrum()
            fn = gaussian_kernel_evidence(values, vectors.T @ r, floor, None if noise_fit else noise)
        else:
            values, vectors = solver.spectrum()
            rotated = vectors.T @ solver.pull_residual(r)
            square = float(model.sharding.sum_((r @ r).reshape(1)))  # over every rank's points
            size = model.problem.total_size
            fn = gaussian_weight_evidence(values, rotated, square, size, floor, None if noise_fit else noise)
        start = [s0, math.log(max(noise - floor, 1e-12))] if noise_fit else [s0]
        x0 = torch.tensor(start)
    result = newton_maximize(fn, x0, tolerance=tolerance, max_iter=max_iter)
    with torch.no_grad():
        model.prior_precision = result.x[0].exp()
        noise_value = None
        if noise_fit:
            noise_value = floor + result.x[1].exp()
            model.likelihood.noise = noise_value
    return HyperparameterFit(
        "spectral",
        result.value,
        result.gradient_norm,
        result.converged,
        result.iterations,
        result.evaluations,
        0.0,
        model.prior_precision.detach().clone(),
        None if noise_value is None else noise_value.reshape(1).clone(),
        result.curve,
    )


# ---------------------------------------------------------------- L-BFGS on the exact evidence
#: the loss (relative to the last evidence) a trial point whose factorization fails is given
_REJECTED_LOSS = 1e6


def _lbfgs(model: LinearizedGP, tolerance: float, max_iter: int) -> HyperparameterFit:
    kernel = model.covar_module
    raw_delta = kernel.raw_prior_precision
    others = [p for n, p in model.named_parameters() if p.requires_grad and p is not raw_delta]
    log_delta = model.prior_precision.detach().log().clone().requires_grad_(True)
    variables = [log_delta] + others
    model.train()
    state: dict[str, Any] = {"evaluations": 0, "last": None}
    curve: list[float] = []

    def closure() -> Tensor:
        state["evaluations"] += 1
        with torch.no_grad():
            kernel.prior_precision = log_delta.detach().exp()
        for v in variables:
            v.grad = None
        raw_delta.grad = None
        try:
            loss = -model.log_evidence()
        except NotPositiveDefiniteError:
            if state["last"] is None:  # the starting point itself: nothing to fall back to
                raise
            # a line-search trial at extreme hyperparameters whose factor failed: a rejected step. A
            # large finite loss with a zero gradient makes the strong-Wolfe search backtrack.
            for v in variables:
                v.grad = torch.zeros_like(v)
            return torch.tensor(_REJECTED_LOSS * (1.0 + abs(state["last"][2])), dtype=torch.float64)
        grads = torch.autograd.grad(loss, [raw_delta] + others, allow_unused=True)
        raw = raw_delta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (slope,) = torch.autograd.grad(kernel.raw_prior_precision_constraint.transform(raw).sum(), raw)
        delta = log_delta.detach().exp()
        g_raw = torch.zeros_like(raw) if grads[0] is None else grads[0]
        log_delta.grad = (g_raw / slope * delta).to(log_delta.dtype)
        for p, g in zip(others, grads[1:]):
            p.grad = torch.zeros_like(p) if g is None else g
        flat = torch.cat([v.grad.reshape(-1).to(torch.float64) for v in variables])
        state["last"] = ([v.detach().clone() for v in variables], float(flat.detach().norm()), -float(loss.detach()))
        return loss.detach()

    iterations, norm, value = 0, math.inf, math.nan
    for _ in range(_RESTARTS):  # a line search that stalls at round-off ends a run early: restart without history
        opt = torch.optim.LBFGS(
            variables,
            lr=1.0,
            max_iter=max_iter - iterations,
            tolerance_grad=tolerance / math.sqrt(sum(v.numel() for v in variables)),
            tolerance_change=0.0,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        opt.step(closure)
        iterations += int(opt.state[variables[0]].get("n_iter", 0))
        values, norm, value = state["last"]
        if not all(torch.equal(a, b.detach()) for a, b in zip(values, variables)):  # last call was a trial point
            closure()
            _, norm, value = state["last"]
        if norm <= tolerance or iterations >= max_iter:
            break
    with torch.no_grad():
        kernel.prior_precision = log_delta.detach().exp()
    curve.append(value)
    noise = _noise_value(model)
    return HyperparameterFit(
        "lbfgs",
        value,
        norm,
        False,
        iterations,
        state["evaluations"],
        0.0,
        model.prior_precision.detach().clone(),
        noise,
        curve,
    )


def _noise_value(model: LinearizedGP) -> Tensor | None:
    noise = getattr(model.likelihood, "noise", None)
    return None if noise is None else noise.detach().reshape(-1).clone()


# ---------------------------------------------------------------- Adam (the former default)
def _adam(model: LinearizedGP, steps: int, lr: float) -> HyperparameterFit:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    curve = []
    loss = None
    for _ in range(steps):
        opt.zero_grad()
        loss = -model.log_evidence()
        loss.backward()
        opt.step()
        curve.append(-float(loss.detach()))
    opt.zero_grad()
    value = model.log_evidence()
    grads = torch.autograd.grad(value, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    norm = float(torch.cat([g.reshape(-1) for g in grads if g is not None]).norm()) if grads else 0.0
    return HyperparameterFit(
        "adam",
        float(value.detach()),
        norm,
        False,
        steps,
        steps + 1,
        0.0,
        model.prior_precision.detach().clone(),
        _noise_value(model),
        curve,
    )
