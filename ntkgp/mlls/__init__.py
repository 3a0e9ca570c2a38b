"""GPyTorch marginal log likelihoods."""

from ntkgp.mlls.laplace_marginal_log_likelihood import LaplaceMarginalLogLikelihood

__all__ = ["LaplaceMarginalLogLikelihood"]
