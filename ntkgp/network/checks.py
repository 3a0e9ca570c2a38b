r"""Checks made once, when a network is built, that turn silent wrong answers into clear errors.

ntkgp linearizes a deterministic function of each example. On a few probe examples it checks
that the network

* has finite parameters (:class:`~ntkgp.errors.NonFiniteError` names the tensor);
* draws no random numbers and gives the same outputs twice (always-on dropout, ``torch.rand`` in
  ``forward``): the global RNG is forked for the check, so the user's stream is untouched;
* maps each example on its own: the outputs for a batch equal those for each example alone (batch
  statistics, e.g. a normalization over the batch dimension, would make them differ);
* returns finite ``(n, C)`` outputs.

Layers whose behaviour depends on ``module.training`` are refused in train mode before any of
this: the GP is the network as it predicts, in eval mode.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ntkgp.errors import NetworkError, NonFiniteError
from ntkgp.network.inputs import Inputs

if TYPE_CHECKING:
    from ntkgp.network.functional import FunctionalNetwork

__all__ = ["check_network", "check_parameters", "refuse_train_mode"]

#: examples used by the probe checks
_PROBE_SIZE = 3


def _train_mode_effect(module: nn.Module) -> str:
    """What a mode-dependent layer does in train mode that it does not do in eval mode."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "normalizes with the batch's statistics, not the running ones"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "updates its running statistics"
    return "zeroes activations at random"


#: the train-mode warning for a network without mode-dependent modules
TRAIN_MODE_WARNING = (
    "the network is in train mode; ntkgp linearizes it as it predicts, in eval mode, on a private "
    "eval-mode copy (your module's flags are not changed). It has no BatchNorm, InstanceNorm or Dropout "
    "modules, but code in its forward that reads self.training, such as functional dropout "
    "F.dropout(x, p, training=self.training) or F.batch_norm(..., training=self.training), runs as in "
    "eval mode here (no dropout, running statistics), so the GP can differ from what the network "
    "computes in train mode. Call net.eval() before building the GP to silence this warning."
)


def refuse_train_mode(net: nn.Module) -> None:
    """Refuse mode-dependent modules in train mode; warn if the network is in train mode without them.

    The warning cannot tell whether the forward reads ``self.training`` (functional dropout or batch
    normalization); running the network in train mode to find out could change it (running
    statistics), so it says what ntkgp does in either case.
    """
    from ntkgp.network.functional import MODE_DEPENDENT_MODULES

    in_train_mode = [
        (name, m) for name, m in net.named_modules() if m.training and isinstance(m, MODE_DEPENDENT_MODULES)
    ]
    if in_train_mode:
        listed = "; ".join(
            f"{name or '<the network itself>'!r} ({type(m).__name__}, which in train mode {_train_mode_effect(m)})"
            for name, m in in_train_mode[:5]
        )
        more = f"; and {len(in_train_mode) - 5} more" if len(in_train_mode) > 5 else ""
        raise ValueError(
            "the network has layers whose output depends on train/eval mode and they are in "
            f"train mode: {listed}{more}. ntkgp linearizes the network as it predicts, in eval mode; "
            "call net.eval() before building the GP."
        )
    if net.training:
        warnings.warn(TRAIN_MODE_WARNING, stacklevel=4)


def check_parameters(network: FunctionalNetwork) -> None:
    """Every parameter (Bayesian or held fixed) must be finite."""
    fixed_params = {n for n, _ in network.module.named_parameters()}
    for name, value in (*network.params.items(), *((n, v) for n, v in network.fixed.items() if n in fixed_params)):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise NonFiniteError(f"the network's parameter {name!r} has {bad} NaN or infinite entries")


def _rng_states(device: torch.device) -> list[Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def check_network(network: FunctionalNetwork, probe: Inputs) -> int:
    """Run the probe checks of the module docstring; return ``C``, the number of outputs."""
    probe = probe[: min(_PROBE_SIZE, probe.num)]
    devices = [network.device] if network.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        before = _rng_states(network.device)
        try:
            first = network.evaluate(probe, grad=False)
        except NetworkError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            raise NetworkError(f"the network cannot be evaluated on the inputs ({probe}): {err}") from err
        consumed = any(not torch.equal(a, b) for a, b in zip(before, _rng_states(network.device)))
        second = network.evaluate(probe, grad=False).detach()
        alone = [network.evaluate(probe[i : i + 1], grad=False) for i in range(probe.num)] if probe.num > 1 else [first]
    finite = torch.isfinite(first).all(-1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise NonFiniteError(f"the network's outputs are NaN or infinite on the probe examples {rows}")
    scale = 1.0 + float(first.abs().max()) if first.numel() else 1.0
    tolerance = 1e3 * torch.finfo(first.dtype).eps * scale if first.is_floating_point() else 0.0
    differs = float((first - second).abs().max()) if first.numel() else 0.0
    if consumed or differs > tolerance:
        raise NetworkError(
            "the network is random: it draws random numbers in forward"
            + (f" and two evaluations on the same inputs differ by {differs:.3g}" if differs > tolerance else "")
            + " (e.g. F.dropout(..., training=True), torch.rand). ntkgp linearizes a deterministic function; "
            "remove the randomness or make it depend on module.training (ntkgp evaluates in eval mode)."
        )
    mixed = float((first - torch.cat(alone)).abs().max()) if first.numel() else 0.0
    if mixed > tolerance:
        raise NetworkError(
            f"the network's output for one example depends on the other examples in its batch (a batch of "
            f"{probe.num} differs from the examples alone by {mixed:.3g}): e.g. batch statistics or a "
            "normalization over the batch dimension. ntkgp needs each example mapped on its own."
        )
    return first.shape[-1]
