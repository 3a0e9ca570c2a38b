r"""Scale the prior precisions to the predictive's best NLL on held-out data.

The evidence-optimal prior of a confidently trained classifier is often far weaker than the one
whose predictive matches the network's in-distribution NLL (``docs/calibration.md``, the
:math:`\delta` sweep). When calibration on data like the test data is the goal and a held-out set
exists, :func:`fit_by_validation` chooses one factor :math:`s` for all prior precisions,
:math:`\delta_g \leftarrow s\,\delta_g` (the groups' ratios, e.g. from an evidence fit, are kept), that
minimizes the mean negative log predictive density of the held-out points:

.. math::
    s^\star = \arg\min_s\; -\frac1{N_v}\sum_{i=1}^{N_v} \log p(y_i \mid x_i, \mathcal D;\, s\,\delta).

The predictive is the model's own (``likelihood(model(x))``: the probit or its configured link for
softmax and Bernoulli, the moment-matched Gaussian for the natural-parameter likelihood, the
marginal Gaussian with the noise for a GaussianLikelihood). The search is a grid in
:math:`\log s` (by default half decades from :math:`10^{-2}` to :math:`10^{6}`), then golden-section
search between the best grid point's neighbours. Each evaluation is a posterior at a new
:math:`\delta` (one factorization for exact solvers) and one prediction of the held-out set.

This is laplace-torch's ``optimize_prior_precision(method="gridsearch")`` with a refinement; it is not
the evidence, and the held-out points must not be the ones you report.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from gpytorch.distributions import MultivariateNormal
from torch import Tensor

from ntkgp.network.inputs import Inputs

if TYPE_CHECKING:
    from ntkgp.models.linearized_gp import LinearizedGP

__all__ = ["ValidationFit", "fit_by_validation", "validation_nll"]

#: the default grid of factors: half decades from 1e-2 to 1e6
DEFAULT_SCALES = tuple(10.0 ** (k / 2) for k in range(-4, 13))
#: golden-section ratio
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
#: golden-section steps at most (each shrinks the bracket by 0.618: 60 steps take a half decade to 1e-13)
_MAX_REFINE = 60


@dataclass
class ValidationFit:
    """The result of :func:`fit_by_validation`.

    ``scale`` is the chosen factor :math:`s`, ``prior_precision`` the precisions set on the model
    (``(G,)``), ``validation_nll`` the mean held-out NLL there (nats per point), ``curve`` every
    ``(scale, nll)`` evaluated in order, ``at_grid_edge`` whether the best grid point was the first or
    last (the optimum may lie outside the grid).
    """

    scale: float
    prior_precision: Tensor
    validation_nll: float
    evaluations: int
    seconds: float
    at_grid_edge: bool
    curve: list[tuple[float, float]] = field(default_factory=list)


def validation_nll(model: LinearizedGP, x: Any, y: Tensor) -> float:
    r"""Mean negative log predictive density of ``y`` at ``x`` under ``model``'s predictive (eval mode).

    Categorical and Bernoulli predictives: :math:`-\log p(y_i)`; Gaussian ones (the natural-parameter
    likelihood's moment-matched Normal, or a GaussianLikelihood's marginals): the Normal density of
    each target with the predictive mean and variance.
    """
    with torch.no_grad():
        predictive = model.likelihood(model(x))
        if isinstance(predictive, MultivariateNormal):  # GaussianLikelihood: per-point marginals
            mean, variance = predictive.mean, predictive.variance
            target = y.to(device=mean.device, dtype=mean.dtype).reshape(mean.shape)
            log_density = torch.distributions.Normal(mean, variance.sqrt()).log_prob(target)
        elif isinstance(predictive, torch.distributions.Bernoulli):
            probs = predictive.probs
            log_density = predictive.log_prob(y.to(device=probs.device, dtype=probs.dtype).reshape(probs.shape))
        elif isinstance(predictive, torch.distributions.Normal):  # the natural-parameter likelihood's
            mean = predictive.mean
            log_density = predictive.log_prob(y.to(device=mean.device, dtype=mean.dtype).reshape(mean.shape))
        elif isinstance(predictive, torch.distributions.Categorical):
            log_density = predictive.log_prob(y.to(predictive.probs.device).reshape(-1).long())
        else:
            raise TypeError(
                f"validation_nll knows Categorical, Bernoulli, Normal and MultivariateNormal predictives; "
                f"{type(model.likelihood).__name__} gives a {type(predictive).__name__}"
            )
    return float(-log_density.to(torch.float64).sum() / y.shape[0])


def _check(x: Any, y: Tensor, scales: tuple[float, ...], tolerance: float) -> None:
    inputs = Inputs.wrap(x, "x_val")
    inputs.check("x_val")
    if not isinstance(y, Tensor):
        raise TypeError(f"y_val must be a tensor, got {type(y).__name__}")
    if y.shape[0] != inputs.num:
        raise ValueError(f"y_val has {y.shape[0]} targets but x_val has {inputs.num} points")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise ValueError("y_val contains NaN or infinite values")
    if len(scales) < 3:
        raise ValueError(f"scales needs at least 3 factors to bracket an optimum, got {len(scales)}")
    if not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"scales must be positive and finite, got {scales}")
    if list(scales) != sorted(set(scales)):
        raise ValueError("scales must be strictly increasing")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be positive and finite, got {tolerance}")


def _search(logs: list[float], objective: Callable[[float], float], tolerance: float) -> tuple[float, float, bool]:
    """Grid, then golden section between the best grid point's neighbours: ``(best log s, its value, at edge)``."""
    values = [objective(v) for v in logs]
    if not any(math.isfinite(v) for v in values):
        raise ValueError("fit_by_validation: the held-out NLL is not finite at any factor of the grid")
    best = min(range(len(logs)), key=values.__getitem__)
    best_log, best_value = logs[best], values[best]
    if best in (0, len(logs) - 1):
        return best_log, best_value, True
    lo, hi = logs[best - 1], logs[best + 1]  # brackets a minimum of the grid
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = objective(a), objective(b)
    for _ in range(_MAX_REFINE):
        if (hi - lo) / math.log(10.0) <= tolerance:
            break
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = objective(b)
    for point, value in ((a, fa), (b, fb)):
        if value < best_value:
            best_log, best_value = point, value
    return best_log, best_value, False


def fit_by_validation(
    model: LinearizedGP,
    x_val: Any,
    y_val: Tensor,
    *,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    tolerance: float = 0.01,
) -> ValidationFit:
    r"""Multiply ``model``'s prior precisions by the factor that minimizes the held-out predictive NLL.

    Parameters
    ----------
    model:
        A :class:`~ntkgp.models.LinearizedGP`, its precisions at their starting values (e.g. after
        :func:`~ntkgp.marglik.fit_hyperparameters`); they are set in place and the model is left in
        eval mode. The noise of a GaussianLikelihood is kept.
    x_val, y_val:
        Held-out inputs (any form the model takes: a tensor, token ids, a tuple or dict) and targets
        ``(N_v,)`` (classes, 0/1, or real targets ``(N_v,)`` / ``(N_v, C)``), not used for training.
    scales:
        Increasing factors :math:`s` of the grid (default: half decades from :math:`10^{-2}` to
        :math:`10^{6}`), relative to the starting precisions.
    tolerance:
        Width in :math:`\log_{10} s` at which the golden-section refinement stops.

    Returns
    -------
    ValidationFit
        Warns (``UserWarning``) when the best grid point is at the grid's edge. On an error during the
        search the precisions are restored to their starting values.
    """
    scales = tuple(float(s) for s in scales)
    _check(x_val, y_val, scales, tolerance)
    started = time.perf_counter()
    base = model.prior_precision.detach().clone()
    model.eval()
    curve: list[tuple[float, float]] = []

    def objective(log_s: float) -> float:
        model.prior_precision = base * math.exp(log_s)
        value = validation_nll(model, x_val, y_val)
        curve.append((math.exp(log_s), value))
        return value if math.isfinite(value) else math.inf

    try:
        best_log, best_value, at_edge = _search([math.log(s) for s in scales], objective, tolerance)
    except BaseException:
        model.prior_precision = base  # an error mid-search leaves the precisions where they started
        raise
    if at_edge:
        warnings.warn(
            f"fit_by_validation: the best factor {math.exp(best_log):.3g} is at the edge of the grid "
            f"[{scales[0]:.3g}, {scales[-1]:.3g}]; the optimum may lie outside it (pass wider scales)",
            UserWarning,
            stacklevel=2,
        )
    model.prior_precision = base * math.exp(best_log)
    return ValidationFit(
        scale=math.exp(best_log),
        prior_precision=model.prior_precision.detach().clone(),
        validation_nll=best_value,
        evaluations=len(curve),
        seconds=time.perf_counter() - started,
        at_grid_edge=at_edge,
        curve=curve,
    )
