"""Memory budgets and the error raised when a dense object will not fit."""

from __future__ import annotations

import os

import torch

from ntkgp.errors import KernelTooLargeError

__all__ = [
    "KERNEL_SPACE_MATRICES",
    "WEIGHT_SPACE_MATRICES",
    "KernelTooLargeError",
    "available_memory",
    "check_fits",
    "default_budget",
]

#: ``M x M`` float64 matrices an exact kernel-space evaluation holds besides the ``G`` cached Grams: the
#: differentiable kernel, its factor, and in the backward pass :math:`A^{-1}`, the gradient and LAPACK
#: workspace. Measured peaks of the first evidence plus backward, the Gram build included (M = 2500 to
#: 4000, G = 1, 3, 6, Gaussian and softmax): G + 4.8 to G + 5.4 such matrices; G + 6 bounds them.
KERNEL_SPACE_MATRICES = 6
#: ``P x P`` float64 matrices an exact weight-space evaluation holds besides the ``C`` cached
#: :math:`J_c^\top J_c` blocks: the precision, its factor, and in the backward pass :math:`A^{-1}` and the
#: gradients of the noise and prior terms. Measured peaks of the first evidence plus backward, the
#: build included (P = 2,000 to 2,900, C = 1 and 3, Gaussian and softmax): C + 5.6 to C + 9.7; C + 11
#: bounds them. Matrices under 32 MiB (P < 2,048), which glibc serves from its heap rather than by mmap,
#: can leave freed blocks resident and push the process's peak a few matrices higher; at that size the
#: whole solve takes under half a GiB.
WEIGHT_SPACE_MATRICES = 11

_GiB = 2**30


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: on CUDA, ``cudaMemGetInfo``'s free bytes plus the blocks PyTorch's
    caching allocator holds but does not use (they are reused before new memory is requested);
    ``MemAvailable`` on Linux CPUs."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * _GiB


def default_budget(device: torch.device) -> int:
    """Working-memory budget for chunked passes: a quarter of free memory, at most 4 GiB."""
    return max(64 * 2**20, min(available_memory(device) // 4, 4 * _GiB))


def check_fits(nbytes: int, what: str, device: torch.device, limit: int | None = None) -> None:
    """Raise :class:`~ntkgp.errors.KernelTooLargeError` if ``nbytes`` exceed ``limit`` (default: free memory).

    The message names the size and the ways out: the approximate routes
    (``ntkgp.solvers.Inducing``, ``SubsetOfData``, ``Lanczos``, ``ConjugateGradients``), a last-layer
    or smaller ``subnetwork``, or the weight-space solver when the network has fewer parameters
    than ``N*C``.
    """
    limit = available_memory(device) if limit is None else limit
    if nbytes > limit:
        raise KernelTooLargeError(
            f"{what} needs {nbytes / _GiB:.2f} GiB but only {limit / _GiB:.2f} GiB are available on {device}. "
            "Use an approximate route with stated accuracy: solver=ntkgp.solvers.Inducing(num_inducing=1000) "
            "(inducing points, memory independent of N), solver=ntkgp.solvers.SubsetOfData(num_points=...) "
            "(the exact GP on a subset), or Lanczos / ConjugateGradients (matrix-free); or make fewer "
            "parameters Bayesian (subnetwork='last_layer'); or, when the network has fewer parameters than "
            "N*C, pass solver='weight'."
        )
