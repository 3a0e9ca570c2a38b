"""The one module of ``benchmarks/`` that imports ntkgp's internals.

The benchmarks time and check pieces that ntkgp does not export: the NTK Gram builder and its
block layout (``ntkgp.gram``), the conv patches and the ``FunctionalNetwork`` module
(``ntkgp.functional``), the parameter-group module (``ntkgp.parameter_groups``) and the TF32
switch (``ntkgp.precision``). Every script and harness module takes them from here, so when the
library renames or moves one of them, this file is the one to change. The public API
(``ntkgp.LinearizedGP``, ``ntkgp.likelihoods``, ``ntkgp.solvers``, ``ntkgp.marglik``, ...) is
imported where it is used.

Importing this module imports ntkgp. Scripts that keep ntkgp out of a process (or out of a
timed region) until they need it import it inside the function that needs it.
"""

from __future__ import annotations

from ntkgp.functional import FunctionalNetwork, conv_patches
from ntkgp.gram import _block_rows, _pair_blocks, conv_route_costs, ntk_gram
from ntkgp.parameter_groups import parameter_groups
from ntkgp.precision import ieee_float32

__all__ = [
    "FunctionalNetwork",
    "conv_patches",
    "conv_route_costs",
    "ieee_float32",
    "ntk_gram",
    "parameter_groups",
    "symmetric_gram_blocks",
]


def symmetric_gram_blocks(n: int, outputs: int) -> list[tuple[int, int, int, int]]:
    """The blocks ``(s1, e1, s2, e2)`` of points that ``ntk_gram`` computes for a symmetric ``n``-point Gram.

    Its lower block triangle: ``ntkgp.gram._pair_blocks`` with ``ntkgp.gram._block_rows`` points
    per block; the blocks above the diagonal are mirrored, not computed.

    Parameters
    ----------
    n : int
        Points.
    outputs : int
        Network outputs per point.

    Returns
    -------
    list of tuple of int
        Start and end points of each block's rows and columns.
    """
    return _pair_blocks(n, n, _block_rows(n, outputs), True)
