"""ntkgp: a trained PyTorch network, linearized, as a Gaussian process.

>>> model = ntkgp.LinearizedGP(net, likelihood, train_x, train_y, prior_precision=1.0)

Packages, from the network up (each imports only those before it):

* :mod:`ntkgp.network`: the network as a pure function of its parameters and inputs (the only
  ``torch.func`` code), read and never written;
* :mod:`ntkgp.structured`: structured Jacobian routes (linear maps, convolutions, embeddings,
  normalization affines, attention projections) from captured layer inputs and cotangents;
* :mod:`ntkgp.ntk`: the products layer (Grams, diagonals, :math:`KV`, :math:`J^\top u`, :math:`Jv`,
  :math:`J^\top\\Lambda J`) over an :class:`~ntkgp.ntk.EmpiricalNTK`;
* :mod:`ntkgp.linalg`: Cholesky, Krylov methods, preconditioners (no networks);
* :mod:`ntkgp.posteriors` and :mod:`ntkgp.solvers`: posteriors and the solvers that build them;
* :mod:`ntkgp.operators`: thin ``linear_operator`` adapters;
* :mod:`ntkgp.kernels`, :mod:`ntkgp.means`, :mod:`ntkgp.likelihoods`, :mod:`ntkgp.mlls`,
  :mod:`ntkgp.models`: the GPyTorch objects;
* :mod:`ntkgp.marglik`: marginal-likelihood training;
* :mod:`ntkgp.distributed`: the training data sharded over ``torch.distributed`` processes (below
  every other package: it uses ``torch`` alone).
"""

from ntkgp import distributed, likelihoods, linalg, marglik, mlls, ntk, solvers
from ntkgp._version import __version__
from ntkgp.errors import (
    IllConditionedWarning,
    KernelTooLargeError,
    NetworkError,
    NoiseVariesError,
    NonFiniteError,
    NotPositiveDefiniteError,
)
from ntkgp.kernels import NTKKernel
from ntkgp.means import LinearizedMean
from ntkgp.models import LinearizedGP
from ntkgp.network import FunctionalNetwork, Inputs
from ntkgp.ntk import EmpiricalNTK, Implementation, PriorLayout
from ntkgp.operators import JacobianLinearOperator, NTKLinearOperator, PosteriorCovariance, TrainingCovariance

__all__ = [
    "EmpiricalNTK",
    "FunctionalNetwork",
    "IllConditionedWarning",
    "Implementation",
    "Inputs",
    "JacobianLinearOperator",
    "KernelTooLargeError",
    "LinearizedGP",
    "LinearizedMean",
    "NTKKernel",
    "NTKLinearOperator",
    "NetworkError",
    "NoiseVariesError",
    "NonFiniteError",
    "NotPositiveDefiniteError",
    "PosteriorCovariance",
    "PriorLayout",
    "TrainingCovariance",
    "__version__",
    "distributed",
    "likelihoods",
    "linalg",
    "marglik",
    "mlls",
    "ntk",
    "solvers",
]
