"""The network as a pure function of its parameters and inputs, read and never written."""

from ntkgp.network.functional import MODE_DEPENDENT_MODULES, FunctionalNetwork, OutputFn
from ntkgp.network.inputs import InputLike, Inputs
from ntkgp.network.subnetwork import SubnetworkSpec, select_parameters

__all__ = [
    "MODE_DEPENDENT_MODULES",
    "FunctionalNetwork",
    "InputLike",
    "Inputs",
    "OutputFn",
    "SubnetworkSpec",
    "select_parameters",
]
