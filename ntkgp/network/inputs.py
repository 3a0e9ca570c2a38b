r"""Inputs in the form the network takes them: one tensor, positional tensors, or keyword tensors.

A network is called as ``net(x)``, ``net(*x)`` or ``net(**x)``. :class:`Inputs` holds ``N``
examples in one of those forms and lets the rest of ntkgp slice, move, check and call them
without knowing which form it is:

* a tensor of any dtype, ``(N, ...)`` (integer token ids pass through unchanged);
* a tuple or list of tensors, each ``(N, ...)``, called as ``net(*x)``;
* a dict of tensors, each ``(N, ...)``, called as ``net(**x)``.

Every tensor leaf shares the leading dimension ``N``. Leaves that are not tensors (``None``,
flags, strings) are passed through unchanged and never sliced. Floating-point leaves are cast
to the network's dtype when the network is called; other dtypes are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

__all__ = ["InputLike", "Inputs"]

Form = Literal["tensor", "args", "kwargs"]
#: What users may pass as inputs: a tensor, a tuple/list of tensors, a dict of tensors, or :class:`Inputs`.
InputLike: TypeAlias = "Tensor | Sequence[Any] | Mapping[str, Any] | Inputs"


class Inputs:
    """``N`` examples as one tensor, positional tensors or keyword tensors (see the module docstring).

    Build with :meth:`wrap`; instances are immutable (every method returns a new one).
    """

    __slots__ = ("_data", "form", "num")

    def __init__(self, data: Any, form: Form, num: int) -> None:
        self._data = data
        #: ``"tensor"``, ``"args"`` (``net(*x)``) or ``"kwargs"`` (``net(**x)``)
        self.form: Form = form
        #: N, the number of examples
        self.num = num

    # ---------------------------------------------------------------- building
    @classmethod
    def wrap(cls, x: InputLike, name: str = "x") -> Inputs:
        """Wrap what a user passed; raises a ``TypeError``/``ValueError`` naming ``name`` on bad input."""
        if isinstance(x, Inputs):
            return x
        if isinstance(x, Tensor):
            if x.dim() == 0:
                raise ValueError(f"{name} is a 0-d tensor; it needs a leading dimension of examples")
            return cls(x, "tensor", x.shape[0])
        if isinstance(x, Mapping):
            bad = [k for k in x if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{name} is a dict whose keys must be strings (keyword arguments); got {bad[:3]}")
            data: Any = dict(x)
            form: Form = "kwargs"
        elif isinstance(x, (tuple, list)):
            data, form = tuple(x), "args"
        else:
            raise TypeError(
                f"{name} must be a tensor, a tuple/list of tensors (net(*x)) or a dict of tensors (net(**x)); "
                f"got {type(x).__name__}"
            )
        leaves = list(_tensor_leaves(data, form))
        if not leaves:
            raise TypeError(f"{name} holds no tensors; at least one leaf must be a tensor of N examples")
        sizes = {key: t.shape[0] if t.dim() else None for key, t in leaves}
        first_key, num = leaves[0][0], sizes[leaves[0][0]]
        for key, size in sizes.items():
            if size is None:
                raise ValueError(
                    f"{name}[{key!r}] is a 0-d tensor; every tensor needs a leading dimension of N examples"
                )
            if size != num:
                raise ValueError(
                    f"the tensors of {name} have different numbers of examples: {name}[{first_key!r}] has "
                    f"{num} and {name}[{key!r}] has {size}; every tensor must share the leading dimension N"
                )
        assert num is not None
        return cls(data, form, num)

    # ---------------------------------------------------------------- access
    @property
    def data(self) -> Any:
        """The wrapped tensor, tuple or dict (as passed to the network)."""
        return self._data

    def tensors(self) -> list[tuple[Any, Tensor]]:
        """``(key, tensor)`` for every tensor leaf (key ``None`` for the single-tensor form)."""
        return list(_tensor_leaves(self._data, self.form))

    @property
    def device(self) -> torch.device:
        return self.tensors()[0][1].device

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point leaf (``None`` when no leaf is floating)."""
        return next((t.dtype for _, t in self.tensors() if t.is_floating_point()), None)

    @property
    def requires_grad(self) -> bool:
        """Whether a leaf requires grad (then network passes keep the graph to the inputs)."""
        return any(t.requires_grad for _, t in self.tensors())

    def __len__(self) -> int:
        return self.num

    def __repr__(self) -> str:
        shapes = [
            f"{'' if k is None else f'{k}: '}{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
            for k, t in self.tensors()
        ]
        return f"Inputs({self.form}, N={self.num}, {', '.join(shapes)})"

    # ------------------------------------------------------------ transforms
    def map(self, fn: Callable[[Tensor], Tensor]) -> Inputs:
        """Apply ``fn`` to every tensor leaf (non-tensor leaves are kept)."""
        data = _map_leaves(self._data, self.form, fn)
        first = next(_tensor_leaves(data, self.form))[1]
        return Inputs(data, self.form, first.shape[0])

    def __getitem__(self, index: slice | Tensor | Sequence[int]) -> Inputs:
        """The examples at ``index`` (a slice, or integer indices on any device)."""
        if isinstance(index, slice):
            return self.map(lambda t: t[index])
        idx = torch.as_tensor(index)
        return self.map(lambda t: t[idx.to(t.device)])

    def chunks(self, size: int) -> Iterator[tuple[int, Inputs]]:
        """``(start, examples[start:start + size])`` over all examples."""
        for start in range(0, self.num, max(1, size)):
            yield start, self[start : start + size]

    def to(self, device: torch.device | str | None = None, float_dtype: torch.dtype | None = None) -> Inputs:
        """Move every leaf to ``device`` and cast the floating-point leaves to ``float_dtype``."""

        def move(t: Tensor) -> Tensor:
            dtype = float_dtype if float_dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=dtype)

        return self.map(move)

    def detach(self) -> Inputs:
        return self.map(Tensor.detach)

    def flat(self) -> Tensor:
        """The single-tensor form flattened to ``(N, D)`` (GPyTorch kernels take this)."""
        if self.form != "tensor":
            raise TypeError("only single-tensor inputs have a flattened (N, D) form")
        return self._data.reshape(self.num, -1)

    @staticmethod
    def concat(parts: Sequence[Inputs]) -> Inputs:
        """The examples of ``parts`` one after the other (same form and keys)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        leaves = [dict(p.tensors()) for p in parts]
        joined = {k: torch.cat([leaf[k] for leaf in leaves]) for k in leaves[0]}
        return first.map_keys(joined)

    def map_keys(self, values: Mapping[Any, Tensor]) -> Inputs:
        """A copy with the tensor leaves replaced by ``values[key]``."""
        if self.form == "tensor":
            t = values[None]
            return Inputs(t, "tensor", t.shape[0])
        if self.form == "args":
            data: Any = tuple(values.get(i, v) if isinstance(v, Tensor) else v for i, v in enumerate(self._data))
        else:
            data = {k: values.get(k, v) if isinstance(v, Tensor) else v for k, v in self._data.items()}
        return Inputs(data, self.form, next(iter(values.values())).shape[0])

    # ------------------------------------------------------------- comparing
    def equal(self, other: Inputs) -> bool:
        """Same form, keys, shapes and values."""
        if self.form != other.form or self.num != other.num:
            return False
        mine, theirs = self.tensors(), other.tensors()
        return len(mine) == len(theirs) and all(
            k1 == k2 and t1.shape == t2.shape and t1.dtype == t2.dtype and torch.equal(t1, t2)
            for (k1, t1), (k2, t2) in zip(mine, theirs)
        )

    def same_structure(self, other: Inputs) -> str | None:
        """``None`` if ``other`` has this form, keys and per-example shapes; else what differs."""
        if self.form != other.form:
            return f"inputs of the form {other.form!r} where the network was built with {self.form!r}"
        mine, theirs = dict(self.tensors()), dict(other.tensors())
        if set(mine) != set(theirs):
            missing, extra = sorted(map(str, set(mine) - set(theirs))), sorted(map(str, set(theirs) - set(mine)))
            return f"missing keys {missing}" + (f" and unexpected keys {extra}" if extra else "")
        for key, t in mine.items():
            if tuple(theirs[key].shape[1:]) != tuple(t.shape[1:]):
                label = "the input" if key is None else f"input {key!r}"
                return (
                    f"{label} has examples of shape {tuple(theirs[key].shape[1:])} where the training examples "
                    f"have shape {tuple(t.shape[1:])}"
                )
        return None

    # --------------------------------------------------------------- calling
    def call(self, fn: Callable[..., Any]) -> Any:
        """``fn(x)``, ``fn(*x)`` or ``fn(**x)``."""
        if self.form == "tensor":
            return fn(self._data)
        if self.form == "args":
            return fn(*self._data)
        return fn(**self._data)

    def args_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments of the network call."""
        if self.form == "tensor":
            return (self._data,), {}
        if self.form == "args":
            return tuple(self._data), {}
        return (), dict(self._data)

    # --------------------------------------------------------------- checks
    def check(self, name: str, device: torch.device | None = None) -> None:
        """Non-empty, finite floating-point leaves, and (with ``device``) every leaf on that device."""
        if self.num == 0:
            raise ValueError(f"{name} is empty; it needs at least one example")
        for key, t in self.tensors():
            label = name if key is None else f"{name}[{key!r}]"
            if t.is_floating_point() or t.is_complex():
                finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(-1)
                if not finite.all():
                    rows = (~finite).nonzero().flatten()[:5].tolist()
                    raise ValueError(f"{label} contains NaN or infinite values (first rows: {rows})")
            if device is not None and t.device != device:
                raise ValueError(f"{label} is on {t.device} but the network is on {device}; move one of them")


def _tensor_leaves(data: Any, form: Form) -> Iterator[tuple[Any, Tensor]]:
    if form == "tensor":
        yield None, data
    elif form == "args":
        yield from ((i, v) for i, v in enumerate(data) if isinstance(v, Tensor))
    else:
        yield from ((k, v) for k, v in data.items() if isinstance(v, Tensor))


def _map_leaves(data: Any, form: Form, fn: Callable[[Tensor], Tensor]) -> Any:
    if form == "tensor":
        return fn(data)
    if form == "args":
        return tuple(fn(v) if isinstance(v, Tensor) else v for v in data)
    return {k: fn(v) if isinstance(v, Tensor) else v for k, v in data.items()}
