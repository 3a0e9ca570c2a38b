"""GPyTorch models."""

from ntkgp.models.linearized_gp import LinearizedGP

__all__ = ["LinearizedGP"]
