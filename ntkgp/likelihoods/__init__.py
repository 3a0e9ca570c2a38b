"""Likelihoods for the linearized-Laplace GP beyond the Gaussian (GPyTorch's Gaussian ones work as they are)."""

from ntkgp.likelihoods.base import LaplaceLikelihood
from ntkgp.likelihoods.bernoulli_likelihood import BernoulliLikelihood
from ntkgp.likelihoods.natural_gaussian_likelihood import HeteroscedasticNormal, NaturalGaussianLikelihood
from ntkgp.likelihoods.softmax_likelihood import SoftmaxLikelihood

__all__ = [
    "BernoulliLikelihood",
    "HeteroscedasticNormal",
    "LaplaceLikelihood",
    "NaturalGaussianLikelihood",
    "SoftmaxLikelihood",
]
