r"""Parameter groups and their prior precisions.

The prior is :math:`\theta \sim \mathcal N(0, P_0^{-1})` with :math:`P_0` diagonal and constant
on each group :math:`g` of parameter tensors: :math:`P_0 = \operatorname{diag}(\delta_{g(p)})`.
The NTK is then a sum of per-group kernels,

.. math::
    k(x, x') = \sum_g \delta_g^{-1}\, J_g(x) J_g(x')^\top .

A ``prior_precision`` specification picks the groups:

* a number (or 0-d tensor): one group holding every parameter tensor;
* a 1-D tensor or sequence with one entry per parameter tensor of ``net.named_parameters()``
  (laplace-torch's "layer-wise" prior); a 1-entry tensor is read as a number;
* a mapping from module name to precision: one group per module, holding the module's
  parameter tensors (the longest matching module name wins). Every parameter tensor must
  be covered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ParameterGroups", "PriorPrecisionSpec", "parameter_groups"]

PriorPrecisionSpec = float | int | Tensor | Sequence[float] | Mapping[str, float]


@dataclass(frozen=True)
class ParameterGroups:
    """How the parameter tensors of a network are grouped under the prior.

    Attributes
    ----------
    names:
        Group names, one per group ``g``.
    tensor_group:
        For each parameter tensor (in ``named_parameters()`` order), the index of its group.
    initial_precision:
        Initial :math:`\\delta_g`, shape ``(G,)``, float64.
    """

    names: tuple[str, ...]
    tensor_group: tuple[int, ...]
    initial_precision: Tensor

    @property
    def num_groups(self) -> int:
        """G, the number of groups."""
        return len(self.names)

    def column_ranges(self, offsets: Sequence[int]) -> list[tuple[int, int, int]]:
        """Merged ``(group, start, stop)`` column ranges of the flattened parameter vector.

        Adjacent parameter tensors of the same group share one range, so per-group
        contractions run as few, large matrix products.
        """
        ranges: list[tuple[int, int, int]] = []
        for t, g in enumerate(self.tensor_group):
            start, stop = offsets[t], offsets[t + 1]
            if ranges and ranges[-1][0] == g and ranges[-1][2] == start:
                ranges[-1] = (g, ranges[-1][1], stop)
            else:
                ranges.append((g, start, stop))
        return ranges

    def expand(self, per_group: Tensor, numels: Sequence[int]) -> Tensor:
        """Per-group values ``(G,)`` -> per-parameter values ``(P,)``."""
        index = torch.tensor(self.tensor_group, device=per_group.device)
        counts = torch.tensor(list(numels), device=per_group.device)
        return per_group[index].repeat_interleave(counts)

    def scale_tangents(self, vectors: Tensor, per_group: Tensor, offsets: Sequence[int]) -> Tensor:
        """Multiply each group's columns of ``vectors`` ``(T, P)`` by ``per_group[g]``."""
        out = vectors.clone()
        for g, start, stop in self.column_ranges(offsets):
            out[:, start:stop] *= per_group[g].to(out.dtype)
        return out


def _check_positive(values: Tensor, what: str) -> None:
    if not torch.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"{what} must be positive and finite, got {values.tolist()}")


def parameter_groups(names: Sequence[str], prior_precision: PriorPrecisionSpec) -> ParameterGroups:
    """Build the :class:`ParameterGroups` for parameter tensors ``names`` from a specification.

    Raises
    ------
    ValueError
        On non-positive or non-finite precisions, a wrong number of entries, unknown module
        names, or parameter tensors not covered by a mapping.
    TypeError
        On an unsupported specification type.
    """
    if isinstance(prior_precision, Mapping):
        return _groups_from_mapping(names, prior_precision)
    if isinstance(prior_precision, (int, float)) and not isinstance(prior_precision, bool):
        values = torch.tensor([float(prior_precision)], dtype=torch.float64)
    elif isinstance(prior_precision, Tensor):
        values = prior_precision.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if prior_precision.dim() > 1:
            raise ValueError(
                f"prior_precision must be a number, a 1-D tensor or a mapping, "
                f"got a tensor of shape {tuple(prior_precision.shape)}"
            )
    elif isinstance(prior_precision, Sequence) and not isinstance(prior_precision, str):
        values = torch.tensor([float(v) for v in prior_precision], dtype=torch.float64)
    else:
        raise TypeError(
            "prior_precision must be a number, a 1-D tensor (one entry per parameter tensor) "
            f"or a mapping from module name to precision, got {type(prior_precision).__name__}"
        )
    _check_positive(values, "prior_precision")
    if values.numel() == 1:
        return ParameterGroups(("all",), (0,) * len(names), values)
    if values.numel() != len(names):
        raise ValueError(
            f"prior_precision has {values.numel()} entries but the network has {len(names)} "
            f"parameter tensors ({', '.join(names)}); give one entry per tensor, a single "
            "number, or a mapping from module name to precision"
        )
    return ParameterGroups(tuple(names), tuple(range(len(names))), values)


def _groups_from_mapping(names: Sequence[str], spec: Mapping[str, float]) -> ParameterGroups:
    if not spec:
        raise ValueError("prior_precision mapping is empty")
    modules = list(spec)
    tensor_group = []
    uncovered = []
    for name in names:
        owners = [i for i, m in enumerate(modules) if m == "" or name == m or name.startswith(m + ".")]
        if not owners:
            uncovered.append(name)
            continue
        tensor_group.append(max(owners, key=lambda i: len(modules[i])))
    if uncovered:
        raise ValueError(
            f"prior_precision mapping does not cover parameter tensors {uncovered}; "
            f"its module names are {modules}"
        )
    unused = [m for i, m in enumerate(modules) if i not in tensor_group]
    if unused:
        raise ValueError(f"prior_precision mapping names modules with no parameters: {unused}")
    values = torch.tensor([float(spec[m]) for m in modules], dtype=torch.float64)
    _check_positive(values, "prior_precision")
    return ParameterGroups(tuple(modules), tuple(tensor_group), values)
