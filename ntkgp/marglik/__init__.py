"""Marginal-likelihood model selection: MAP training, hyperparameter fitting, online training, subset bounds;
and the held-out alternative, :func:`fit_by_validation`."""

from ntkgp.marglik.fit import ConvergenceWarning, HyperparameterFit, fit_hyperparameters
from ntkgp.marglik.map import train_map
from ntkgp.marglik.online import MarglikTuner, OnlineMarglikResult, fit_online_marglik, negative_log_likelihood
from ntkgp.marglik.partitions import class_partition, random_partition
from ntkgp.marglik.subset_bound import SubsetEvidenceBound
from ntkgp.marglik.validation import ValidationFit, fit_by_validation, validation_nll

__all__ = [
    "ConvergenceWarning",
    "HyperparameterFit",
    "MarglikTuner",
    "OnlineMarglikResult",
    "SubsetEvidenceBound",
    "ValidationFit",
    "class_partition",
    "fit_by_validation",
    "fit_hyperparameters",
    "fit_online_marglik",
    "negative_log_likelihood",
    "random_partition",
    "train_map",
    "validation_nll",
]
