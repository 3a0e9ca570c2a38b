"""Lazy linear operators: thin adapters of :mod:`ntkgp.ntk` and of the solvers to linear_operator."""

from ntkgp.operators.jacobian import JacobianLinearOperator
from ntkgp.operators.ntk import NTKLinearOperator
from ntkgp.operators.posterior_covariance import PosteriorCovariance
from ntkgp.operators.training_covariance import TrainingCovariance

__all__ = ["JacobianLinearOperator", "NTKLinearOperator", "PosteriorCovariance", "TrainingCovariance"]
