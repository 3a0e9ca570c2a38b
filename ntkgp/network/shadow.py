r"""Reading the user's network without writing to it: private module copies, one per thread.

:func:`torch.func.functional_call` evaluates a module with other parameter values by swapping
them into the module's attributes for the duration of the call and swapping the originals
back after. On the user's own module that is a write, and two threads doing it at once corrupt
it: each can restore the other's snapshot as the "original", leaving detached tensors in place
of the user's Parameters.

ntkgp therefore never calls the user's module. :class:`ModuleShadow` keeps a private copy of
it, made once by ``copy.deepcopy`` with every parameter and buffer *shared* (the copy costs no
tensor memory), put in eval mode, and hands each thread its own copy of that. Swaps happen on
the calling thread's copy only; the user's module, its ``training`` flags and its Parameters
are never touched. A module that cannot be deep-copied (it holds a lock or a file handle, say)
is evaluated in place instead, one thread at a time under a lock, with its ``training`` flags
set to eval for the call and restored after; a warning says so.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["ModuleShadow"]


def _eval_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that shares its parameters and buffers, with every submodule in eval mode."""
    memo: dict[int, Any] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    shadow = copy.deepcopy(module, memo)
    for m in shadow.modules():
        m.training = False
    return shadow


class ModuleShadow:
    """Per-thread private eval-mode copies of a module (see the module docstring)."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._local = threading.local()
        self._lock = threading.RLock()
        try:
            self._template: nn.Module | None = _eval_copy(module)
        except Exception as err:  # noqa: BLE001 (any failure of deepcopy means: evaluate in place)
            self._template = None
            warnings.warn(
                f"ntkgp could not make a private copy of the network ({type(err).__name__}: {err}); it will "
                "evaluate your module in place, one thread at a time, switching it to eval mode during each call",
                stacklevel=4,
            )

    @property
    def copied(self) -> bool:
        """Whether calls run on private copies (``False``: in place, under a lock)."""
        return self._template is not None

    @contextlib.contextmanager
    def module(self) -> Iterator[nn.Module]:
        """The module to call on this thread, for the duration of the block."""
        if self._template is None:
            with self._lock, _eval_mode(self._module):
                yield self._module
            return
        shadow = getattr(self._local, "module", None)
        if shadow is None:
            with self._lock:  # deepcopy reads the template's dicts: one thread at a time
                shadow = self._local.module = _eval_copy(self._template)
        yield shadow

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self._module, "template": self._template}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._module, self._template = state["module"], state["template"]
        self._local, self._lock = threading.local(), threading.RLock()


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block, the exact previous flags restored after."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, training in flags:
            m.training = training
