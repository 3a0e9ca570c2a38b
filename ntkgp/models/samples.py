r"""Pathwise function samples of a :class:`~ntkgp.LinearizedGP`: functions one can evaluate anywhere, consistently.

The linearized network is linear in its weights, so a function sample is a weight sample:

.. math::
    f_s(x) = f(x;\hat\theta) + J(x)(\theta_s - \hat\theta).

* **Prior** (:func:`prior_samples`): :math:`\theta_s \sim \mathcal N(0, P_0^{-1})`, one jvp per
  evaluation (all samples at once).
* **Posterior** (:func:`posterior_samples`), by Matheron's rule on the weights: with a prior draw
  :math:`\theta_s` and noise :math:`\varepsilon_s \sim \mathcal N(0, S)`,

  .. math::
      \theta_s' = \bar\theta + \theta_s - P_0^{-1}J^\top (K + S)^{-1}(J\theta_s + \varepsilon_s)
      \;\sim\; \mathcal N\big(\bar\theta, (P_0 + J^\top S^{-1}J)^{-1}\big),

  one jvp and one vjp over the training data and a solve with the cached factor per batch of
  samples (kernel space). For a Laplace GP, :math:`S^{-1}` becomes :math:`\Lambda = BB^\top` and
  the solve is with :math:`I + B^\top K B`: :math:`\theta_s' = \hat\theta + \theta_s - P_0^{-1}J^\top B
  (I + B^\top K B)^{-1}(B^\top J\theta_s + \varepsilon_s)`, :math:`\varepsilon_s \sim \mathcal N(0, I)`.
  In weight space the cached factor :math:`T` of the posterior precision :math:`A = TT^\top` gives the
  same law directly, :math:`\theta_s' = \bar\theta + T^{-\top}z_s`
  (:meth:`~ntkgp.posteriors.weight_space.WeightSpacePosterior.draw`; :math:`T` is the Cholesky factor, or
  after points were added its Woodbury form, :mod:`ntkgp.linalg.woodbury`).

The draws are fixed when the :class:`FunctionSamples` is made: every call evaluates the same ``S``
functions, at any inputs (batched ones too), differentiably in them (Thompson sampling by
gradient ascent). Nothing ``P x P`` or ``N* x N*`` is formed: ``S x P`` weights are kept.
Exact solvers only (the approximate posteriors have no weight-space law to sample).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ntkgp.linalg.factor import factor_solve
from ntkgp.linalg.hessian_root import apply_root, apply_root_transpose
from ntkgp.network.inputs import InputLike
from ntkgp.ntk import EmpiricalNTK, pullback, pushforward
from ntkgp.posteriors.bordered import BorderedKernelSpacePosterior
from ntkgp.posteriors.kernel_space import KernelSpacePosterior
from ntkgp.posteriors.weight_space import WeightSpacePosterior
from ntkgp.solvers.base import GaussianSolver

if TYPE_CHECKING:
    from ntkgp.models.linearized_gp import LinearizedGP

__all__ = ["FunctionSamples", "posterior_samples", "prior_samples"]


class FunctionSamples:
    r"""``S`` functions :math:`f(x;\hat\theta) + J(x)\Delta_s`, with fixed weight offsets ``Delta`` ``(S, P)``.

    Call it on inputs ``x`` of the training inputs' form: ``(n, ...)`` gives ``(S, n, C)``; a batched
    single-tensor input ``(*batch, q, d)`` gives ``(S, *batch, q, C)``. Float64 results.
    """

    def __init__(self, model: LinearizedGP, offsets: Tensor) -> None:
        self.model = model
        #: :math:`\theta_s - \hat\theta`, ``(S, P)``, float64
        self.offsets = offsets

    @property
    def ntk(self) -> EmpiricalNTK:
        return self.model.ntk

    @property
    def num_samples(self) -> int:
        return self.offsets.shape[0]

    def __call__(self, x: InputLike) -> Tensor:
        model = self.model
        example = model.train_x.data.shape[1:] if model.train_x.form == "tensor" else None
        lead = None
        if isinstance(x, Tensor) and example is not None and x.dim() > len(example) + 1:
            lead, x = x.shape[: x.dim() - len(example)], x.reshape(-1, *example)
        inputs = model.inputs(x)
        f = model.network.forward(inputs).to(torch.float64)  # shape: (n, C)
        out = f + pushforward(self.ntk, inputs, self.offsets).to(torch.float64)  # shape: (S, n, C)
        return out if lead is None else out.reshape(self.num_samples, *lead, model.num_outputs)


def _normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)


def _prior_draws(model: LinearizedGP, num_samples: int, generator: torch.Generator | None) -> Tensor:
    r""":math:`\theta_s \sim \mathcal N(0, P_0^{-1})`, ``(S, P)`` float64."""
    variance = model.layout.expand(model.prior_precision.detach().to(torch.float64)).reciprocal()
    z = _normal((num_samples, model.network.num_parameters), generator, variance.device)
    return z * variance.sqrt()


@torch.no_grad()
def prior_samples(
    model: LinearizedGP, num_samples: int, *, generator: torch.Generator | None = None
) -> FunctionSamples:
    r"""``num_samples`` functions from the GP prior, :math:`\theta_s \sim \mathcal N(0, P_0^{-1})`."""
    theta = _prior_draws(model, num_samples, generator)
    return FunctionSamples(model, theta - model.network.flat_params.to(torch.float64))


@torch.no_grad()
def posterior_samples(
    model: LinearizedGP, num_samples: int, *, generator: torch.Generator | None = None, batch: int = 256
) -> FunctionSamples:
    r"""``num_samples`` functions from the GP posterior at the current hyperparameters (see the module docstring).

    ``generator`` seeds the draws (CPU generator; the draws are moved to the network's device);
    ``batch`` samples share one pass over the training data.
    """
    posterior = model.posterior()
    theta_hat = model.network.flat_params.to(torch.float64)
    if isinstance(posterior, WeightSpacePosterior):
        z = _normal((model.network.num_parameters, num_samples), generator, theta_hat.device)
        return FunctionSamples(model, posterior.draw(z) - theta_hat)
    if not isinstance(posterior, KernelSpacePosterior):
        raise NotImplementedError(
            f"pathwise samples need an exact solver ('kernel' or 'weight'); this GP's posterior is a "
            f"{type(posterior).__name__}"
        )
    delta = model.prior_precision.detach().to(torch.float64)
    x, n, C = model.train_x, model.num_data, model.num_outputs
    root = posterior.hessian_root
    noise_sd = None if root is not None else model.noise_diagonal().detach().to(torch.float64).sqrt()
    parts = []
    for start in range(0, num_samples, batch):
        s = min(batch, num_samples - start)
        theta = _prior_draws(model, s, generator)  # shape: (s, P)
        f = pushforward(model.ntk, x, theta).to(torch.float64).reshape(s, n * C).T  # shape: (NC, s)
        eps = _normal((n * C, s), generator, f.device)
        if root is None:
            solver = model.solver
            assert noise_sd is not None and isinstance(solver, GaussianSolver)
            u = solver.solve(delta, noise_sd.square(), f + noise_sd[:, None] * eps)  # (K + S)^{-1}(J θ + ε)
        else:
            u = _laplace_solve(posterior, apply_root_transpose(root, f) + eps)
            u = apply_root(root, u)
        pulled = pullback(model.ntk, x, u.T.reshape(s, n, C), scale=delta.reciprocal())  # shape: (s, P)
        parts.append(posterior.weights + theta - pulled)
    return FunctionSamples(model, torch.cat(parts) - theta_hat)


def _laplace_solve(posterior: KernelSpacePosterior, rhs: Tensor) -> Tensor:
    r""":math:`(I + B^\top K B)^{-1}\,\text{rhs}` with the posterior's cached factor."""
    factor = posterior.bordered if isinstance(posterior, BorderedKernelSpacePosterior) else posterior.cholesky_factor
    return factor_solve(factor, rhs)
