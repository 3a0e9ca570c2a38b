"""ntkgp: a trained PyTorch network, linearized, as a Gaussian process.

>>> model = ntkgp.LinearizedGP(net, likelihood, train_x, train_y, prior_precision=1.0)
"""

from ntkgp import inducing, likelihoods, linalg, marglik, mlls, solvers
from ntkgp.functional import FunctionalNetwork
from ntkgp.kernels import NTKKernel
from ntkgp.means import LinearizedMean
from ntkgp.memory import KernelTooLargeError
from ntkgp.models import LinearizedGP
from ntkgp.operators import ExactNTKCovariance, JacobianLinearOperator, NTKLinearOperator, PosteriorCovariance
from ntkgp.parameter_groups import ParameterGroups, parameter_groups
from ntkgp.solvers import NotPositiveDefiniteError

__version__ = "0.1.0"

__all__ = [
    "ExactNTKCovariance",
    "FunctionalNetwork",
    "JacobianLinearOperator",
    "KernelTooLargeError",
    "LinearizedGP",
    "LinearizedMean",
    "NTKKernel",
    "NTKLinearOperator",
    "NotPositiveDefiniteError",
    "ParameterGroups",
    "PosteriorCovariance",
    "inducing",
    "likelihoods",
    "linalg",
    "marglik",
    "mlls",
    "solvers",
    "parameter_groups",
]
