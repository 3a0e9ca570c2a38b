r"""Train a network to a MAP estimate, and fit a LinearizedGP's hyperparameters by its evidence.

The GP identities of ntkgp (evidence = linearized-Laplace evidence, posterior mean = network)
hold at a MAP of the same objective the GP encodes,

.. math::
    -\log p(y \mid f(X;\theta)) + \tfrac12 \textstyle\sum_g \delta_g \lVert\theta_g\rVert^2 ,

so :func:`train_map` minimizes exactly that, full batch: Adam to get close, then L-BFGS to make
the gradient small. :func:`fit_hyperparameters` then maximizes ``model.log_evidence()``.
"""

from __future__ import annotations

import torch
from gpytorch.likelihoods import Likelihood
from torch import Tensor, nn

from ntkgp.marglik.online import negative_log_likelihood
from ntkgp.parameter_groups import PriorPrecisionSpec, parameter_groups

__all__ = ["fit_hyperparameters", "train_map"]


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
) -> float:
    """Full-batch MAP fit of ``net`` under ``likelihood`` and the Gaussian prior; returns the final gradient norm.

    ``prior_precision`` takes the forms of :class:`~ntkgp.models.LinearizedGP` (a number, one
    value per parameter tensor, or ``{module: value}``); build the GP with the same value. For
    Gaussian likelihoods the current noise is used (and not changed).
    """
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    groups = parameter_groups(names, prior_precision)
    params = dict(net.named_parameters())
    tensors = [params[n] for n in names]
    delta = [float(groups.initial_precision[g]) for g in groups.tensor_group]

    def objective() -> Tensor:
        penalty = sum(0.5 * d * t.square().sum() for d, t in zip(delta, tensors))
        return negative_log_likelihood(likelihood, net(train_x), train_y) + penalty

    adam = torch.optim.Adam(tensors, lr=lr)
    for _ in range(adam_steps):
        adam.zero_grad()
        objective().backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(tensors, max_iter=lbfgs_steps, tolerance_grad=tolerance_grad,
                              tolerance_change=0.0, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    if lbfgs_steps:
        lbfgs.step(closure)
    for t in tensors:
        t.grad = None
    grads = torch.autograd.grad(objective(), tensors)
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def fit_hyperparameters(model: torch.nn.Module, *, steps: int = 200, lr: float = 0.1) -> list[float]:
    """Adam on ``model.parameters()`` (prior precisions, noise) maximizing ``model.log_evidence()``.

    Returns the log evidence after each step. Works for every likelihood (exact evidence for
    Gaussian ones, Laplace evidence otherwise); leaves the model in eval mode.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = -model.log_evidence()
        loss.backward()
        opt.step()
        curve.append(-float(loss))
    model.eval()
    return curve
