"""Marginal-likelihood model selection: subset-NTK evidence bounds (and, later, online training)."""

from ntkgp.marglik.partitions import class_partition, random_partition
from ntkgp.marglik.subset_bound import SubsetEvidenceBound

__all__ = ["SubsetEvidenceBound", "class_partition", "random_partition"]
