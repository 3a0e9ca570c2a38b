"""Fitting a model's hyperparameters (prior precision δ, noise σ²) on its log evidence."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def fit_evidence(
    model: Any, optimizer: str, steps: int, lr: float, *, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9
) -> int:
    """Maximize ``model.log_evidence()`` over ``model.parameters()`` (δ, σ²).

    Parameters
    ----------
    model : ntkgp.LinearizedGP
        The model; its hyperparameters are changed in place.
    optimizer : {"lbfgs", "adam"}
        ``"lbfgs"``: L-BFGS with strong Wolfe line search, learning rate ``lr``, at most ``steps``
        iterations; ``"adam"``: ``steps`` Adam steps at ``lr``.
    steps : int
        Iterations (L-BFGS) or steps (Adam).
    lr : float
        Learning rate.
    tolerance_grad, tolerance_change : float
        L-BFGS's stopping tolerances.

    Returns
    -------
    int
        Evaluations of the evidence (with its gradient).
    """
    params = list(model.parameters())
    evaluations = 0
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            params,
            lr=lr,
            max_iter=steps,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            nonlocal evaluations
            evaluations += 1
            opt.zero_grad()
            loss = -model.log_evidence()
            loss.backward()
            return loss

        opt.step(closure)
        return evaluations
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        evaluations += 1
        opt.zero_grad()
        (-model.log_evidence()).backward()
        opt.step()
    return evaluations
