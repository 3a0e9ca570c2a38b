"""The exceptions and warnings ntkgp raises, one place for all of them.

Each names a class of problem so that callers can catch it and the docs can table it
(``docs/api.md``, "Bad input").
"""

from __future__ import annotations

__all__ = [
    "IllConditionedWarning",
    "KernelTooLargeError",
    "NetworkError",
    "NoiseVariesError",
    "NonFiniteError",
    "NotPositiveDefiniteError",
]


class KernelTooLargeError(MemoryError):
    """A dense kernel, Jacobian product or factor would not fit in the available memory."""


class NotPositiveDefiniteError(RuntimeError):
    """The matrix to factor is not numerically positive definite."""


class NetworkError(ValueError):
    """The network cannot be linearized as given: it is random, mixes the examples of a batch,
    returns something other than one ``(n, C)`` tensor, or cannot be evaluated on the inputs."""


class NonFiniteError(NetworkError):
    """The network's parameters, or its outputs on some inputs, are NaN or infinite."""


class NoiseVariesError(ValueError):
    """A solver that needs one noise variance per output got noise that varies over data points."""


class IllConditionedWarning(UserWarning):
    """A factorization's conditioning leaves the result with a relative error above the stated bound."""
