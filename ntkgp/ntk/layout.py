r"""The prior's layout over the parameter vector: tensors, their columns, and their groups.

The prior is :math:`\theta \sim \mathcal N(0, P_0^{-1})` with :math:`P_0` diagonal and constant on
each group :math:`g` of parameter tensors, :math:`P_0 = \operatorname{diag}(\delta_{g(p)})`. The NTK
is then a sum of per-group kernels,

.. math::
    k(x, x') = \sum_g \delta_g^{-1}\, J_g(x) J_g(x')^\top .

A ``prior_precision`` specification picks the groups:

* a number (or 0-d tensor): one group holding every parameter tensor;
* a 1-D tensor or sequence with one entry per parameter tensor of :math:`\theta` (laplace-torch's
  "layer-wise" prior); a 1-entry tensor is read as a number;
* a mapping from module name to precision: one group per module, holding the module's parameter
  tensors (the longest matching module name wins). Every parameter tensor must be covered;
* ``"scalar"``, ``"tensor"`` or ``"module"``: one group, one group per parameter tensor, or one group
  per module that owns parameters (its weight and bias together; a normalization layer's affine
  :math:`\gamma, \beta` form their own group), each starting at :math:`\delta = 1`. ``"module"``
  gives every layer, and so every normalized layer, its own precision: the weights feeding a
  BatchNorm/LayerNorm/GroupNorm are scale-invariant in training, so one precision shared with the
  rest of the network is misspecified (Antorán et al., ICML 2022).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeAlias

import torch
from torch import Tensor

__all__ = ["PriorLayout", "PriorPrecisionSpec"]

#: The forms of ``prior_precision=`` (see the module docstring).
PriorPrecisionSpec: TypeAlias = "float | int | Tensor | Sequence[float] | Mapping[str, float] | str"

#: the named prior structures of a ``prior_precision`` string
PRIOR_STRUCTURES = ("scalar", "tensor", "module")


@dataclass(frozen=True)
class PriorLayout:
    r"""The parameter tensors of :math:`\theta`, their columns in the flat vector, and their prior groups.

    Attributes
    ----------
    names, numels:
        The tensors of :math:`\theta`, in order, and their sizes.
    group_names:
        One name per group ``g``.
    tensor_group:
        For each tensor, the index of its group.
    initial_precision:
        The :math:`\delta_g` of the specification, ``(G,)``, float64.
    """

    names: tuple[str, ...]
    numels: tuple[int, ...]
    group_names: tuple[str, ...]
    tensor_group: tuple[int, ...]
    initial_precision: Tensor = field(compare=False)

    # ------------------------------------------------------------------ sizes
    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Column offset of each tensor, and ``P`` last."""
        out = [0]
        for n in self.numels:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def num_parameters(self) -> int:
        """P, the number of scalar parameters."""
        return self.offsets[-1]

    @property
    def num_groups(self) -> int:
        """G, the number of groups."""
        return len(self.group_names)

    # ------------------------------------------------------------- columns
    def column_ranges(self, tensors: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
        """Merged ``(group, start, stop)`` column ranges of the vector of ``tensors`` (all by default, in that order).

        Adjacent tensors of the same group share one range, so per-group contractions run as few,
        large matrix products.
        """
        ranges: list[tuple[int, int, int]] = []
        start = 0
        for t in range(len(self.names)) if tensors is None else tensors:
            stop, g = start + self.numels[t], self.tensor_group[t]
            if ranges and ranges[-1][0] == g and ranges[-1][2] == start:
                ranges[-1] = (g, ranges[-1][1], stop)
            else:
                ranges.append((g, start, stop))
            start = stop
        return ranges

    def width(self, tensors: Sequence[int]) -> int:
        """Columns of the vector of ``tensors``."""
        return sum(self.numels[t] for t in tensors)

    # ------------------------------------------------------ per-group values
    def expand(self, per_group: Tensor) -> Tensor:
        """Per-group values ``(G,)`` -> per-parameter values ``(P,)``."""
        index = torch.tensor(self.tensor_group, device=per_group.device)
        counts = torch.tensor(list(self.numels), device=per_group.device)
        return per_group[index].repeat_interleave(counts)

    def scale(self, vectors: Tensor, per_group: Tensor, tensors: Sequence[int] | None = None) -> Tensor:
        """Multiply each group's columns of ``vectors`` ``(T, P)`` (or ``tensors``' columns) by ``per_group[g]``."""
        out = vectors.clone()
        for g, start, stop in self.column_ranges(tensors):
            out[..., start:stop] *= per_group[g].to(out.dtype)
        return out

    def group_sums(self, values: Tensor, tensors: Sequence[int] | None = None) -> Tensor:
        """Sum ``values`` ``(..., P)`` (or ``tensors``' columns) over each group's columns: ``(..., G)``, float64."""
        out = torch.zeros(*values.shape[:-1], self.num_groups, dtype=torch.float64, device=values.device)
        for g, start, stop in self.column_ranges(tensors):
            out[..., g] += values[..., start:stop].to(torch.float64).sum(-1)
        return out

    @staticmethod
    def weighted(weights: Tensor, per_group: Tensor) -> Tensor:
        r""":math:`\sum_g w_g M_g` for ``per_group`` ``(G, ...)``, in its dtype; differentiable in ``weights``."""
        return torch.einsum("g,g...->...", weights.to(per_group.dtype), per_group)

    # -------------------------------------------------------------- building
    @classmethod
    def from_spec(cls, names: Sequence[str], numels: Sequence[int], spec: PriorPrecisionSpec) -> PriorLayout:
        """The layout of tensors ``names`` under a ``prior_precision`` specification.

        Raises
        ------
        ValueError
            On non-positive or non-finite precisions, a wrong number of entries, unknown module
            names, or parameter tensors not covered by a mapping.
        TypeError
            On an unsupported specification type.
        """
        names, numels = tuple(names), tuple(numels)
        if isinstance(spec, str):
            spec = _structure(names, spec)
        if isinstance(spec, Mapping):
            group_names, tensor_group, values = _from_mapping(names, spec)
            return cls(names, numels, group_names, tensor_group, values)
        values = _values(spec)
        _check_positive(values, "prior_precision")
        if values.numel() == 1:
            return cls(names, numels, ("all",), (0,) * len(names), values)
        if values.numel() != len(names):
            raise ValueError(
                f"prior_precision has {values.numel()} entries but θ has {len(names)} parameter tensors "
                f"({', '.join(names)}); give one entry per tensor, a single number, or a mapping from module "
                "name to precision"
            )
        return cls(names, numels, names, tuple(range(len(names))), values)


def _structure(names: tuple[str, ...], structure: str) -> float | list[float] | dict[str, float]:
    """The specification a named structure stands for (every precision 1)."""
    if structure == "scalar":
        return 1.0
    if structure == "tensor":
        return [1.0] * len(names)
    if structure == "module":
        return {name.rpartition(".")[0]: 1.0 for name in names}
    raise ValueError(
        "prior_precision must be a number, a 1-D tensor, a mapping from module name to precision, or one of "
        f"{PRIOR_STRUCTURES}; got the string {structure!r}"
    )


def _values(spec: object) -> Tensor:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return torch.tensor([float(spec)], dtype=torch.float64)
    if isinstance(spec, Tensor):
        if spec.dim() > 1:
            raise ValueError(
                f"prior_precision must be a number, a 1-D tensor or a mapping, got a tensor of shape "
                f"{tuple(spec.shape)}"
            )
        return spec.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return torch.tensor([float(v) for v in spec], dtype=torch.float64)
    raise TypeError(
        "prior_precision must be a number, a 1-D tensor (one entry per parameter tensor) "
        f"or a mapping from module name to precision, got {type(spec).__name__}"
    )


def _check_positive(values: Tensor, what: str) -> None:
    if not torch.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"{what} must be positive and finite, got {values.tolist()}")


def _from_mapping(names: tuple[str, ...], spec: Mapping[str, float]) -> tuple[tuple[str, ...], tuple[int, ...], Tensor]:
    if not spec:
        raise ValueError("prior_precision mapping is empty")
    modules = list(spec)
    tensor_group, uncovered = [], []
    for name in names:
        owners = [i for i, m in enumerate(modules) if m == "" or name == m or name.startswith(m + ".")]
        if not owners:
            uncovered.append(name)
            continue
        tensor_group.append(max(owners, key=lambda i: len(modules[i])))
    if uncovered:
        raise ValueError(
            f"prior_precision mapping does not cover parameter tensors {uncovered}; its module names are {modules}"
        )
    unused = [m for i, m in enumerate(modules) if i not in tensor_group]
    if unused:
        raise ValueError(f"prior_precision mapping names modules with no parameters: {unused}")
    values = torch.tensor([float(spec[m]) for m in modules], dtype=torch.float64)
    _check_positive(values, "prior_precision")
    return tuple(modules), tuple(tensor_group), values
