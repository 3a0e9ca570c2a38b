"""Freeing GPU memory without waiting for the garbage collector.

Every ``gpytorch.Module`` registers a bound method of itself as its own ``load_state_dict``
pre-hook. That is a reference cycle (module -> hook table -> bound method -> module), so a
module is never freed when its last reference goes, only when Python's cycle collector runs.
For a :class:`~ntkgp.LinearizedGP` this matters: it holds Gram matrices and Cholesky factors
of gigabytes, and a loop that builds one model per step (the online marglik tuner, model
comparison) can fill a GPU before the collector runs. :func:`drop_self_references`
re-registers such hooks so that they reach their module through a weak reference, the way
``torch.nn.Module.register_load_state_dict_pre_hook`` does. ``load_state_dict`` behaves as
before. It covers the modules present when it is called (``LinearizedGP`` calls it at the end of
its construction); a submodule assigned later keeps its own cycle.
"""

from __future__ import annotations

from typing import Any

from torch import nn

try:  # private in torch; without it the cycles stay and the collector frees the modules
    from torch.nn.modules.module import _WrappedHook as _hook_type

    _WrappedHook: Any = _hook_type
except ImportError:  # pragma: no cover
    _WrappedHook = None

__all__ = ["drop_self_references"]


def drop_self_references(module: nn.Module) -> None:
    """Make ``module`` and its submodules reach themselves from their pre-hooks weakly."""
    if _WrappedHook is None:  # pragma: no cover
        return
    for sub in module.modules():
        hooks = sub._load_state_dict_pre_hooks
        for key, wrapped in list(hooks.items()):
            hook: Any = getattr(wrapped, "hook", None)
            if getattr(hook, "__self__", None) is sub and not getattr(wrapped, "with_module", True):
                # _WrappedHook with a module keeps a weakref and calls hook(module, *args)
                hooks[key] = _WrappedHook(hook.__func__, sub)
