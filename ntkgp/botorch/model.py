r"""A :class:`~ntkgp.LinearizedGP` as a BoTorch ``Model``: the surrogate of Bayesian optimisation."""

from __future__ import annotations

from typing import Any

import torch
from botorch.acquisition.objective import PosteriorTransform
from botorch.models.model import FantasizeMixin, Model
from botorch.posteriors.gpytorch import GPyTorchPosterior
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.likelihoods import FixedNoiseGaussianLikelihood, Likelihood
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from ntkgp.botorch.fantasies import Fantasies
from ntkgp.models.batched import BatchedInputs, batched_distribution
from ntkgp.models.linearized_gp import LinearizedGP
from ntkgp.network.inputs import Inputs
from ntkgp.solvers.base import output_noise

__all__ = ["LinearizedGPModel"]


class LinearizedGPModel(Model, FantasizeMixin):
    r"""BoTorch's view of a :class:`~ntkgp.LinearizedGP` (a trained network's linearized-Laplace GP).

    ``posterior(X)`` for ``X`` of shape ``(*batch, q, d)`` is a ``GPyTorchPosterior`` holding the
    joint distribution over the ``q`` points of each batch, ``C = num_outputs`` outputs each
    (a ``MultitaskMultivariateNormal`` when ``C > 1``), differentiable in ``X``: analytic (LogEI,
    UCB) and Monte Carlo (qLogNEI) acquisitions optimise it with ``botorch.optim.optimize_acqf``.
    Its covariance is the exact GP posterior of the linearized network (never a ``(bqC)^2`` matrix:
    one ``qC x qC`` block per batch).

    Conditioning: one set of observations ``X (n', d)``, ``Y (n', m)`` is added to the GP by a
    rank-``n'C`` update of its cached factor (:meth:`~ntkgp.LinearizedGP.get_fantasy_model`); batches
    of observations (``fantasize``, ``Y (s, *batch, n', m)``) condition the posterior exactly,
    per batch (:class:`~ntkgp.botorch.fantasies.Fantasies`). The network is never retrained: refit
    it and build a new GP when the data change for good (what a BO loop does each round).

    Likelihoods: Gaussian ones (regression) are what BoTorch needs. For a Laplace GP (classification
    or heteroscedastic likelihoods of :mod:`ntkgp.likelihoods`) the posterior is over the latent
    function (the network's outputs, e.g. logits) and works in acquisitions; observation noise
    and conditioning are refused (the observation model is not Gaussian, and new data move the MAP).

    Parameters
    ----------
    model:
        The GP. It is put in eval mode when a posterior is computed.
    """

    _supports_cache_root = False  # BoTorch's cached-root path needs GPyTorch internals this model does not have

    def __init__(self, model: LinearizedGP, *, fantasies: Fantasies | None = None) -> None:
        if not isinstance(model, LinearizedGP):
            raise TypeError(f"LinearizedGPModel wraps an ntkgp.LinearizedGP, got {type(model).__name__}")
        super().__init__()
        self.model = model
        #: batched observations the posterior is conditioned on (``None`` for none)
        self.fantasies = fantasies

    @property
    def num_outputs(self) -> int:
        """C, the network's outputs."""
        return self.model.num_outputs

    @property
    def batch_shape(self) -> torch.Size:
        """``torch.Size([])``, or the batch shape of the fantasies conditioned on."""
        return torch.Size([]) if self.fantasies is None else self.fantasies.batch_shape

    @property
    def likelihood(self) -> Likelihood:
        """The GP's likelihood."""
        return self.model.likelihood

    # ------------------------------------------------------------ posterior
    def _latent(self, X: Tensor) -> MultivariateNormal:
        if self.fantasies is not None:
            return self.fantasies.distribution(self.model, X)
        example = self.model.train_x.data.shape[1:] if self.model.train_x.form == "tensor" else None
        if example is None:
            raise TypeError("LinearizedGPModel needs a network on single-tensor inputs (BoTorch's X)")
        batch, q = X.shape[:-2], X.shape[-2]
        flat = Inputs.wrap(X.reshape(-1, *example))
        return batched_distribution(self.model, BatchedInputs(flat, batch, q), prior=False)

    def posterior(  # type: ignore[override]  # BoTorch's own GPyTorchModel.posterior has this signature
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: PosteriorTransform | None = None,
        **kwargs: Any,
    ) -> GPyTorchPosterior:
        r"""The joint posterior over the ``q`` points of ``X`` ``(*batch, q, d)`` (or ``(q, d)``).

        ``observation_noise``: ``True`` adds the likelihood's noise (Gaussian likelihoods whose noise
        is a hyperparameter), a tensor ``(*batch, q, m)`` adds those variances; ``output_indices``
        keeps some outputs; ``posterior_transform`` is applied last.
        """
        if X.dim() < 2:
            raise ValueError(f"X must have shape (*batch, q, d), got {tuple(X.shape)}")
        if any(module.training for module in self.modules()):  # eval() walks every module: skipped when done
            self.eval()
        X = self.transform_inputs(X)
        mvn = self._latent(X)
        if observation_noise is not False:
            mvn = self._add_noise(mvn, observation_noise, X.shape[-2])
        if output_indices is not None:
            mvn = _select_outputs(mvn, list(output_indices), self.num_outputs)
        posterior = GPyTorchPosterior(mvn)
        return posterior if posterior_transform is None else posterior_transform(posterior)

    def _add_noise(self, mvn: MultivariateNormal, noise: bool | Tensor, q: int) -> MultivariateNormal:
        C = self.num_outputs
        if self.model.is_laplace:
            raise ValueError(
                "a Laplace GP has no Gaussian observation noise: its posterior is over the latent function "
                "(use observation_noise=False)"
            )
        if isinstance(noise, Tensor):
            variances = noise.to(mvn.mean.dtype).expand(*mvn.batch_shape, q, C).reshape(*mvn.batch_shape, q * C)
        else:
            variances = _likelihood_noise(self.model, C).to(mvn.mean.dtype).repeat(q)
        cov = DenseLinearOperator(mvn.covariance_matrix + torch.diag_embed(variances.expand(*mvn.batch_shape, q * C)))
        if C == 1:
            return MultivariateNormal(mvn.mean, cov)
        return MultitaskMultivariateNormal(mvn.mean, cov, interleaved=True)

    # --------------------------------------------------------- conditioning
    def condition_on_observations(
        self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs: Any
    ) -> LinearizedGPModel:
        r"""The model conditioned on ``Y`` ``(*batch', n', m)`` at ``X`` ``(*batch, n', d)`` (see the class docstring).

        ``noise`` (``(*batch, n', m)``): the new observations' noise variances, required with a
        ``FixedNoiseGaussianLikelihood``; other likelihoods use their noise hyperparameter.
        """
        if self.model.is_laplace:
            raise NotImplementedError(
                "conditioning a Laplace GP on new observations moves the network's MAP: retrain the network on all "
                "the data and wrap a new LinearizedGP"
            )
        C = self.num_outputs
        if Y.shape[-1] != C or Y.shape[-2] != X.shape[-2]:
            raise ValueError(f"Y must have shape (*batch, {X.shape[-2]}, {C}), got {tuple(Y.shape)}")
        fixed = isinstance(self.model.likelihood, FixedNoiseGaussianLikelihood)
        if fixed and noise is None:
            raise ValueError("a FixedNoiseGaussianLikelihood needs noise= (the new observations' noise variances)")
        if not fixed and noise is not None:
            raise ValueError("noise= is for FixedNoiseGaussianLikelihood; this likelihood's noise is a hyperparameter")
        X = self.transform_inputs(X)
        if self.fantasies is None and X.dim() == 2 and Y.dim() == 2:
            targets = Y[:, 0] if C == 1 else Y
            fixed_noise = None if noise is None else noise[..., 0]
            return LinearizedGPModel(self.model.get_fantasy_model(X.detach(), targets.detach(), noise=fixed_noise))
        if noise is None:
            noise = _likelihood_noise(self.model, C).expand(*Y.shape[:-2], Y.shape[-2], C)
        new = Fantasies(X.detach(), Y.detach(), noise.detach().to(Y.dtype))
        return LinearizedGPModel(self.model, fantasies=new if self.fantasies is None else self.fantasies.merge(new))


def _likelihood_noise(model: LinearizedGP, C: int) -> Tensor:
    """The noise variance of a new observation, one per output, ``(C,)``."""
    if isinstance(model.likelihood, FixedNoiseGaussianLikelihood):
        raise ValueError(
            "a FixedNoiseGaussianLikelihood has no noise for new points: pass observation_noise as a tensor"
        )
    with torch.no_grad():
        return output_noise(model.noise_diagonal(), C, "BoTorch")


def _select_outputs(mvn: MultivariateNormal, outputs: list[int], C: int) -> MultivariateNormal:
    """The joint distribution of some outputs of an interleaved multi-output ``mvn``."""
    if C == 1:
        if outputs != [0]:
            raise ValueError(f"output_indices {outputs} for a single-output model")
        return mvn
    q = mvn.mean.shape[-2]
    rows = torch.tensor([i * C + c for i in range(q) for c in outputs], device=mvn.mean.device)
    mean = mvn.mean[..., outputs]
    cov = DenseLinearOperator(mvn.covariance_matrix[..., rows, :][..., :, rows])
    if len(outputs) == 1:
        return MultivariateNormal(mean[..., 0], cov)
    return MultitaskMultivariateNormal(mean, cov, interleaved=True)
