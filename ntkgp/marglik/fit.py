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
  L-BFGS stopping short of the tolerance, or reaching the round-off of the evidence at the linearized
  mode (a float32 network's), is finished by Newton steps on the gradient alone (:func:`_gradient_polish`);
* ``"adam"``: ``steps`` Adam steps of learning rate ``lr`` on ``model.parameters()`` (the former default).

Convergence is the norm of the gradient in the fitted variables (:math:`\log\delta`, and the noise's
raw parameter) against ``tolerance``; a :class:`ConvergenceWarning` says when it was not reached.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

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


class _Evaluation(NamedTuple):
    """An accepted evidence evaluation of the L-BFGS fit."""

    #: the variables' values (log delta first, then the likelihood's raw parameters)
    values: list[Tensor]
    #: the gradient of the loss (the negative log evidence) in them, flat, float64
    gradient: Tensor
    log_evidence: float

    @property
    def point(self) -> Tensor:
        """The values, flat, float64."""
        return torch.cat([v.reshape(-1).to(torch.float64) for v in self.values])

    @property
    def norm(self) -> float:
        return float(self.gradient.norm())


def _lbfgs(model: LinearizedGP, tolerance: float, max_iter: int) -> HyperparameterFit:
    kernel = model.covar_module
    raw_delta = kernel.raw_prior_precision
    others = [p for n, p in model.named_parameters() if p.requires_grad and p is not raw_delta]
    log_delta = model.prior_precision.detach().log().clone().requires_grad_(True)
    variables = [log_delta] + others
    model.train()
    # "last": the last accepted _Evaluation; "rejected": whether the last call was a rejected trial
    state: dict[str, Any] = {"evaluations": 0, "last": None, "rejected": False, "polishing": False}
    curve: list[float] = []
    # the evidence at the linearized mode carries the network dtype's round-off: below it, gradients only
    noisy = model.mode_finder is not None
    round_off = _ROUND_OFF * torch.finfo(model.network.dtype).eps

    def reject(why: str) -> Tensor:
        if state["last"] is None:  # the starting point itself: nothing to fall back to
            raise ValueError(f"fit_hyperparameters: {why} at the starting hyperparameters")
        # a line-search trial at extreme hyperparameters: a rejected step. A large finite loss with a
        # zero gradient makes the strong-Wolfe search backtrack.
        state["rejected"] = True
        for v in variables:
            v.grad = torch.zeros_like(v)
        return torch.tensor(_REJECTED_LOSS * (1.0 + abs(state["last"].log_evidence)), dtype=torch.float64)

    def closure() -> Tensor:
        state["evaluations"] += 1
        trial = log_delta.detach().exp()
        if not (torch.isfinite(trial).all() and (trial > 0).all()):  # a step past exp's float64 range
            return reject("the prior precisions are not finite and positive")
        with torch.no_grad():
            kernel.prior_precision = trial
        for v in variables:
            v.grad = None
        raw_delta.grad = None
        try:
            loss = -model.log_evidence()
        except NotPositiveDefiniteError:
            if state["last"] is None:
                raise
            return reject("the factor is not positive definite")
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
        if not (torch.isfinite(loss) and torch.isfinite(flat).all()):
            # e.g. a trial at delta = 1e-192, where the kernel's 1/delta overflows the gradient
            return reject("the evidence or its gradient is not finite")
        previous = state["last"]
        last = _Evaluation([v.detach().clone() for v in variables], flat.detach().clone(), -float(loss.detach()))
        state["rejected"], state["last"] = False, last
        if noisy and previous is not None and not state["polishing"]:
            moved = float((last.point - previous.point).norm())
            turned = float((last.gradient - previous.gradient).norm())
            # the gain a Newton step would make, |g|^2 / 2H, with the curvature H from the last two points
            gain = last.norm**2 * moved / (2 * turned) if moved > 0 and turned > 0 else math.inf
            if gain < round_off * max(1.0, abs(last.log_evidence)):
                raise _BelowRoundOff
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
        try:
            opt.step(closure)
        except _BelowRoundOff:
            iterations += int(opt.state[variables[0]].get("n_iter", 0))
            norm, value = state["last"].norm, state["last"].log_evidence
            break
        iterations += int(opt.state[variables[0]].get("n_iter", 0))
        if not all(torch.equal(a, b.detach()) for a, b in zip(state["last"].values, variables)):  # a trial point
            closure()
        norm, value = state["last"].norm, state["last"].log_evidence
        if norm <= tolerance or iterations >= max_iter:
            break
    if norm > tolerance and iterations < max_iter:
        state["polishing"] = True
        steps, norm, value = _gradient_polish(closure, variables, state, tolerance, max_iter - iterations)
        iterations += steps
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


#: the evidence's round-off at the linearized mode, in units of the network dtype's epsilon times its value:
#: measured 1e-5 nats at 119 nats (float32), 0.7 eps (see :func:`_gradient_polish`); 100x above that
_ROUND_OFF = 100.0


class _BelowRoundOff(Exception):
    """The gain left is below the evidence's round-off: the line search would compare noise."""


#: the finite-difference step (in log delta and the raw noise) of the polish's Hessian
_POLISH_STEP = 1e-2
#: halvings of a polish step whose gradient norm is not smaller
_POLISH_HALVINGS = 4


def _gradient_polish(
    closure: Any, variables: list[Tensor], state: dict[str, Any], tolerance: float, budget: int
) -> tuple[int, float, float]:
    r"""Newton steps on the gradient alone, after L-BFGS stopped short of ``tolerance``: ``(steps, norm, value)``.

    The evidence at the linearized model's mode (:mod:`ntkgp.solvers.mode`) of a float32 network carries the
    round-off of its network passes: its value changes by 1e-5 nats between two evaluations at the same
    :math:`\delta` reached along different paths (a BatchNorm CNN on 200 digits, P = 690), its gradient by
    1e-6 to 2e-5. Near the optimum the gain a step can make, about :math:`|g|^2/2H`, falls under that noise
    (at :math:`|g| = 10^{-3}`, about 1e-7 nats), the strong-Wolfe line search compares round-off and L-BFGS
    stops well above ``tolerance`` (48 evaluations and :math:`|g|` = 2e-4 there). The gradient itself is
    still accurate to far below ``tolerance``, so the fit ends with Newton steps that use only gradients: the
    Hessian by forward differences of the gradient (step :data:`_POLISH_STEP`, one evaluation per variable),
    then steps :math:`-H^{-1}g` accepted when the gradient norm falls (halved :data:`_POLISH_HALVINGS` times
    otherwise), until ``tolerance``, ``budget`` steps, or a step that does not lower it.
    """
    x0 = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in variables])

    def evaluate(x: Tensor) -> tuple[Tensor, float] | None:
        with torch.no_grad():
            offset = 0
            for v in variables:
                v.copy_(x[offset : offset + v.numel()].reshape(v.shape).to(v.dtype))
                offset += v.numel()
        loss = closure()
        return None if state["rejected"] else (state["last"].gradient, -float(loss))

    g, value = state["last"].gradient, state["last"].log_evidence  # the last evaluation was at the variables' values
    n = x0.numel()
    hessian = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        shifted = evaluate(x0 + _POLISH_STEP * torch.eye(n, dtype=torch.float64)[i])
        if shifted is None:
            evaluate(x0)
            return 0, float(g.norm()), value
        hessian[:, i] = (shifted[0] - g) / _POLISH_STEP
    x, steps, at_x = x0, 0, False  # at_x: the last evaluation was at x
    while float(g.norm()) > tolerance and steps < budget:
        values, vectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))  # of the loss: positive at a maximum
        floor = 1e-8 * float(values.abs().max())
        step = -(vectors @ ((vectors.T @ g) / values.abs().clamp_min(floor)))
        accepted = None
        for _ in range(_POLISH_HALVINGS + 1):
            trial, at_x = evaluate(x + step), False
            if trial is not None and float(trial[0].norm()) < float(g.norm()):
                accepted = trial
                break
            step = 0.5 * step
        if accepted is None:
            break
        if n == 1:  # one variable: the secant through the accepted step (superlinear)
            turned = float(accepted[0][0] - g[0])
            if turned != 0.0:
                hessian[0, 0] = turned / float(step[0])
        x, (g, value), steps, at_x = x + step, accepted, steps + 1, True
    if not at_x:  # the variables and the cached state end at the best point
        evaluate(x)
    return steps, float(g.norm()), value


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
