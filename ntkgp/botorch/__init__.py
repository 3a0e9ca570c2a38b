"""ntkgp as a BoTorch surrogate (``pip install ntkgp[botorch]``).

:class:`LinearizedGPModel` wraps a :class:`~ntkgp.LinearizedGP` as a BoTorch ``Model``: joint
posteriors over ``q`` points, differentiable in the inputs, for analytic and Monte Carlo
acquisition functions and ``optimize_acqf``; conditioning on new observations and fantasies. See
``docs/bayesopt.md``.
"""

try:
    import botorch  # noqa: F401
except ImportError as err:  # pragma: no cover
    raise ImportError("ntkgp.botorch needs BoTorch: pip install 'ntkgp[botorch]'") from err

from ntkgp.botorch.fantasies import Fantasies
from ntkgp.botorch.model import LinearizedGPModel

__all__ = ["Fantasies", "LinearizedGPModel"]
