"""Lazy linear operators built on the network's jvp and vjp."""

from ntkgp.operators.exact_ntk_covariance import ExactNTKCovariance
from ntkgp.operators.jacobian_linear_operator import JacobianLinearOperator
from ntkgp.operators.ntk_linear_operator import NTKLinearOperator
from ntkgp.operators.posterior_covariance import PosteriorCovariance

__all__ = ["ExactNTKCovariance", "JacobianLinearOperator", "NTKLinearOperator", "PosteriorCovariance"]
