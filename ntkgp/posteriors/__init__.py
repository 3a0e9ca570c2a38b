"""Posteriors at fixed hyperparameters: predictive means and covariances, one class per form."""

from ntkgp.posteriors.base import Posterior
from ntkgp.posteriors.downdate import DowndatePosterior
from ntkgp.posteriors.inducing import InducingPosterior
from ntkgp.posteriors.kernel_space import KernelSpacePosterior
from ntkgp.posteriors.low_rank import LowRankPosterior
from ntkgp.posteriors.prior_kernel import PriorKernel
from ntkgp.posteriors.weight_space import WeightSpacePosterior

__all__ = [
    "DowndatePosterior",
    "InducingPosterior",
    "KernelSpacePosterior",
    "LowRankPosterior",
    "Posterior",
    "PriorKernel",
    "WeightSpacePosterior",
]
