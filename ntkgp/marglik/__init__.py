"""Marginal-likelihood model selection: MAP training, hyperparameter fitting, online training, subset bounds."""

from ntkgp.marglik.fit import ConvergenceWarning, HyperparameterFit, fit_hyperparameters
from ntkgp.marglik.map import train_map
from ntkgp.marglik.online import MarglikTuner, OnlineMarglikResult, fit_online_marglik, negative_log_likelihood
from ntkgp.marglik.partitions import class_partition, random_partition
from ntkgp.marglik.subset_bound import SubsetEvidenceBound

__all__ = [
    "ConvergenceWarning",
    "HyperparameterFit",
    "MarglikTuner",
    "OnlineMarglikResult",
    "SubsetEvidenceBound",
    "class_partition",
    "fit_hyperparameters",
    "fit_online_marglik",
    "negative_log_likelihood",
    "random_partition",
    "train_map",
]
