"""GPyTorch means."""

from ntkgp.means.linearized_mean import LinearizedMean

__all__ = ["LinearizedMean"]
