r"""Train a network to a MAP estimate, and fit a LinearizedGP's hyperparameters by its evidence.

The GP identities of ntkgp (evidence = linearized-Laplace evidence, posterior mean = network)
hold at a MAP of the same objective the GP encodes,

.. math::
    -\log p(y \mid f(X;\theta)) + \tfrac12 \textstyle\sum_g \delta_g \lVert\theta_g\rVert^2 ,

so :func:`train_map` minimizes exactly that, full batch: Adam to get close, L-BFGS to make the
gradient small, and for small networks exact Newton steps to take it to round-off.
:func:`ntkgp.marglik.fit_hyperparameters` then maximizes ``model.log_evidence()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from gpytorch.likelihoods import Likelihood
from torch import Tensor, nn

from ntkgp.marglik.online import negative_log_likelihood
from ntkgp.ntk.layout import PriorLayout, PriorPrecisionSpec

__all__ = ["train_map"]


def train_map(
    net: nn.Module,
    likelihood: Likelihood,
    train_x: Tensor,
    train_y: Tensor,
    prior_precision: PriorPrecisionSpec = 1.0,
    *,
    adam_steps: int = 1000,
    lbfgs_steps: int = 200,
    lr: float = 1e-2,
    tolerance_grad: float = 1e-9,
    newton_max_parameters: int = 1000,
) -> float:
    """Full-batch MAP fit of ``net`` under ``likelihood`` and the Gaussian prior; returns the final gradient norm.

    ``prior_precision`` takes the forms of :class:`~ntkgp.models.LinearizedGP` (a number, one
    value per parameter tensor, or ``{module: value}``); build the GP with the same value. For
    Gaussian likelihoods the current noise is used (and not changed).

    L-BFGS's line search stalls once the loss decreases it needs fall below the loss's rounding:
    on an ill-conditioned problem that can leave a gradient norm of 1e-7 or 1e-5 depending on the
    BLAS. For networks of at most ``newton_max_parameters`` parameters, up to
    :data:`_NEWTON_STEPS` exact Newton steps (dense Hessian by double backward, ``P`` passes)
    follow, each kept only if it lowers the gradient norm; they converge quadratically to
    round-off.
    """
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = dict(net.named_parameters())
    tensors = [params[n] for n in names]
    groups = PriorLayout.from_spec(names, [t.numel() for t in tensors], prior_precision)
    delta = [float(groups.initial_precision[g]) for g in groups.tensor_group]

    def objective() -> Tensor:
        penalty = sum(0.5 * d * t.square().sum() for d, t in zip(delta, tensors))
        return negative_log_likelihood(likelihood, net(train_x), train_y) + penalty

    adam = torch.optim.Adam(tensors, lr=lr)
    for _ in range(adam_steps):
        adam.zero_grad()
        objective().backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(
        tensors,
        max_iter=lbfgs_steps,
        tolerance_grad=tolerance_grad,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    if lbfgs_steps:
        lbfgs.step(closure)
    for t in tensors:
        t.grad = None
    norm = _gradient_norm(objective, tensors)
    if sum(t.numel() for t in tensors) <= newton_max_parameters:
        norm = _newton_polish(objective, tensors, norm, tolerance_grad)
    return norm


#: exact Newton steps at most in :func:`train_map`'s polish
_NEWTON_STEPS = 5


def _gradient_norm(objective: Callable[[], Tensor], tensors: Sequence[Tensor]) -> float:
    grads = torch.autograd.grad(objective(), tensors)
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def _newton_polish(objective: Callable[[], Tensor], tensors: Sequence[Tensor], norm: float, tolerance: float) -> float:
    """Newton steps with the dense Hessian (double backward), each kept only if it lowers the gradient norm."""
    for _ in range(_NEWTON_STEPS):
        if norm <= tolerance:
            break
        grads = torch.autograd.grad(objective(), tensors, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = [
            torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat[i], tensors, retain_graph=True)])
            for i in range(flat.numel())
        ]
        hessian = torch.stack(rows).to(torch.float64)
        step = torch.linalg.lstsq(hessian, flat.detach().to(torch.float64)[:, None]).solution[:, 0]
        saved = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            offset = 0
            for t in tensors:
                t -= step[offset : offset + t.numel()].reshape(t.shape).to(t.dtype)
                offset += t.numel()
        new = _gradient_norm(objective, tensors)
        if not new < norm:  # not a descent in the gradient norm (indefinite Hessian, round-off): undo, stop
            with torch.no_grad():
                for t, old in zip(tensors, saved):
                    t.copy_(old)
            break
        norm = new
    return norm
