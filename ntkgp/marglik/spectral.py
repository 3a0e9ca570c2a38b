r"""The evidence as a closed-form function of one prior precision (and one noise variance), from one eigendecomposition.

With one prior group, :math:`K = K_1/\delta`, and one noise variance :math:`\sigma^2`, every matrix the
evidence needs is diagonal in a fixed eigenbasis, so after one eigendecomposition (by the solver's
``spectrum()``) each value and gradient costs ``O(n)``. The unknowns are
:math:`s = \log\delta` and :math:`t = \log(\sigma^2 - \sigma^2_{\min})` (the noise's lower bound).

* Gaussian, kernel space, :math:`K_1 = U\operatorname{diag}(\lambda)U^\top`, :math:`\tilde r = U^\top r`, ``M`` values:

  .. math:: \mathcal L = -\tfrac12\sum_i\Big(\frac{\tilde r_i^2}{v_i} + \log v_i\Big) - \tfrac M2\log 2\pi,
            \qquad v_i = \lambda_i/\delta + \sigma^2 .

* Gaussian, weight space, :math:`J^\top J = V\operatorname{diag}(\mu)V^\top`, :math:`\tilde b = V^\top J^\top r`,
  :math:`a_i = \delta + \mu_i/\sigma^2` (Woodbury and the determinant lemma):

  .. math:: \mathcal L = -\tfrac12\Big(\frac{r^\top r}{\sigma^2} - \sum_i\frac{\tilde b_i^2}{\sigma^4 a_i}
            + M\log\sigma^2 - P\log\delta + \sum_i\log a_i + M\log 2\pi\Big).

* Laplace at fixed :math:`\Lambda` (``mode="map"``), :math:`\mu` the eigenvalues of :math:`J^\top\Lambda J` or
  :math:`B^\top K_1 B`:

  .. math:: \mathcal L = \log p(y\mid\hat f) - \tfrac\delta2\lVert\hat\theta\rVert^2
            - \tfrac12\sum_i\log(1 + \mu_i/\delta).

:func:`newton_maximize` then finds the optimum by Newton's method in these one or two variables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "NewtonResult",
    "gaussian_kernel_evidence",
    "gaussian_weight_evidence",
    "laplace_evidence",
    "newton_maximize",
]

Evidence = Callable[[Tensor], Tensor]


def _noise(t: Tensor, floor: float) -> Tensor:
    return floor + t.exp()


def gaussian_kernel_evidence(eigenvalues: Tensor, rotated: Tensor, floor: float, noise: float | None) -> Evidence:
    r"""``x -> L`` for ``x = (s, t)``, or ``x = (s,)`` with the noise fixed at ``noise``.

    ``rotated`` is :math:`U^\top r` ``(M,)``, ``eigenvalues`` :math:`\lambda` ``(M,)``."""
    lam, r2, m = eigenvalues, rotated.square(), eigenvalues.numel()

    def evidence(x: Tensor) -> Tensor:
        var = noise if noise is not None else _noise(x[1], floor)
        v = lam * torch.exp(-x[0]) + var
        return -0.5 * ((r2 / v).sum() + v.log().sum() + m * math.log(2 * math.pi))

    return evidence


def gaussian_weight_evidence(
    eigenvalues: Tensor, rotated: Tensor, residual_sq: float, num_values: int, floor: float, noise: float | None
) -> Evidence:
    r"""``x -> L`` in weight space.

    ``eigenvalues`` :math:`\mu` ``(P,)``, ``rotated`` :math:`V^\top J^\top r` ``(P,)``, ``residual_sq``
    :math:`r^\top r`, ``num_values`` M."""
    mu, b2, p = eigenvalues, rotated.square(), eigenvalues.numel()

    def evidence(x: Tensor) -> Tensor:
        var = torch.as_tensor(noise, dtype=x.dtype) if noise is not None else _noise(x[1], floor)
        delta = x[0].exp()
        a = delta + mu / var
        quad = residual_sq / var - (b2 / a).sum() / var.square()
        log_det = num_values * var.log() - p * x[0] + a.log().sum()
        return -0.5 * (quad + log_det + num_values * math.log(2 * math.pi))

    return evidence


def laplace_evidence(eigenvalues: Tensor, log_likelihood: float, theta_sq: float) -> Evidence:
    r"""``x = (s,) -> L`` for the Laplace evidence at fixed :math:`\Lambda`."""
    mu = eigenvalues

    def evidence(x: Tensor) -> Tensor:
        return log_likelihood - 0.5 * x[0].exp() * theta_sq - 0.5 * torch.log1p(mu * torch.exp(-x[0])).sum()

    return evidence


@dataclass
class NewtonResult:
    """The optimum of :func:`newton_maximize`: point, value, gradient norm, steps and the values along the way."""

    x: Tensor
    value: float
    gradient_norm: float
    iterations: int
    evaluations: int
    converged: bool
    curve: list[float] = field(default_factory=list)


def newton_maximize(
    fn: Evidence, x0: Tensor, *, tolerance: float = 1e-8, max_iter: int = 100, max_step: float = 3.0
) -> NewtonResult:
    r"""Maximize a smooth ``fn`` of a few variables by Newton's method with backtracking.

    Where the Hessian is not negative definite the step is the gradient (ascent); steps are capped
    at ``max_step`` in norm (units of :math:`\log`) and halved until the value increases. Stops
    when the gradient norm is at most ``tolerance``. Each evaluation costs what ``fn`` does (``O(n)``).
    """
    x = x0.detach().to(torch.float64).clone()
    evaluations, curve = 0, []

    def value_grad(point: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal evaluations
        evaluations += 1
        point = point.detach().requires_grad_(True)
        out = fn(point)
        (grad,) = torch.autograd.grad(out, point)
        return out.detach(), grad

    value, grad = value_grad(x)
    curve.append(float(value))
    for it in range(max_iter):
        if float(grad.norm()) <= tolerance:
            return NewtonResult(x, float(value), float(grad.norm()), it, evaluations, True, curve)
        hessian = torch.autograd.functional.hessian(fn, x)
        step = grad
        try:
            if bool((torch.linalg.eigvalsh(hessian) < 0).all()):
                step = -torch.linalg.solve(hessian, grad)
        except RuntimeError:  # singular Hessian: gradient step
            pass
        if float(step.norm()) > max_step:
            step = step * (max_step / float(step.norm()))
        t = 1.0
        while t > 1e-12:
            new_value, new_grad = value_grad(x + t * step)
            if torch.isfinite(new_value) and float(new_value) >= float(value):
                break
            t *= 0.5
        else:
            return NewtonResult(x, float(value), float(grad.norm()), it, evaluations, False, curve)
        x, value, grad = x + t * step, new_value, new_grad
        curve.append(float(value))
    converged = float(grad.norm()) <= tolerance
    return NewtonResult(x, float(value), float(grad.norm()), max_iter, evaluations, converged, curve)
