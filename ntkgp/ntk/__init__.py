r"""The products layer: every product of the empirical NTK that the operators and the solvers need.

A small functional core, below both :mod:`ntkgp.operators` and :mod:`ntkgp.solvers`; every
function takes an :class:`EmpiricalNTK` (network, prior layout, budget, routes) first.

* Grams and cross-Grams: :func:`gram` (per group or weighted), :func:`structured_gram`;
* diagonals: :func:`gram_diagonal` (per group), :func:`point_blocks` (per-point ``C x C``);
* products: :func:`kernel_matmul` (:math:`KV`), :func:`pullback` (:math:`P_0^{-1}J^\top U`),
  :func:`pushforward` (:math:`JV`);
* weight space: :func:`jacobian` (per-example :math:`J`), :func:`jacobian_outer` (:math:`J^\top\Lambda J`);
* captures of inputs for the structured routes: :func:`captures`.
"""

from ntkgp.ntk.captures import cached_captures, captures
from ntkgp.ntk.diagonal import gram_diagonal, point_blocks
from ntkgp.ntk.engine import EmpiricalNTK, Implementation, NTKProblem
from ntkgp.ntk.gram import gram, structured_gram
from ntkgp.ntk.layout import PriorLayout, PriorPrecisionSpec
from ntkgp.ntk.products import (
    jacobian,
    jacobian_outer,
    kernel_matmul,
    kernel_matmul_columns,
    outputs,
    outputs_and_pushforward,
    pullback,
    pushforward,
    uses_factor_form,
    uses_kronecker_outer,
)

__all__ = [
    "EmpiricalNTK",
    "Implementation",
    "NTKProblem",
    "PriorLayout",
    "PriorPrecisionSpec",
    "cached_captures",
    "captures",
    "gram",
    "gram_diagonal",
    "jacobian",
    "jacobian_outer",
    "kernel_matmul",
    "kernel_matmul_columns",
    "outputs",
    "outputs_and_pushforward",
    "point_blocks",
    "pullback",
    "pushforward",
    "structured_gram",
    "uses_factor_form",
    "uses_kronecker_outer",
]
