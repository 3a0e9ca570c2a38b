r"""The prior NTK at test inputs, and its cross-covariance with fixed reference inputs.

Every posterior of :mod:`ntkgp.posteriors` has predictive covariance

.. math::
    \Sigma_{**} = K_{**} - V^\top V,

where :math:`K_{**}` is the prior NTK at the test inputs and :math:`V` ``(r, n_* C)`` is a
downdate. The exact kernel-space posterior takes :math:`V = L^{-1} B^\top K_{X*}`, the inducing
posterior :math:`V = F^\top K_{Z*}`, the low-rank posteriors :math:`V = (J_* W)^\top`.
:class:`PriorKernel` computes :math:`K_{**}` (dense or as per-point ``C x C`` blocks) and
:math:`K_{R*}` against reference inputs :math:`R` in one pass over a test block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK, captures, point_blocks, structured_gram
from ntkgp.ntk.captures import captures_fit
from ntkgp.ntk.generic import generic_jacobian, generic_rows
from ntkgp.ntk.tiles import operand_layout, operands, operands_of, streamed_cross
from ntkgp.structured.capture import UnitCapture, differentiable

__all__ = ["PriorKernel"]


class PriorKernel:
    r"""Prior blocks :math:`K_{**}` at test inputs and the cross-kernel :math:`K_{R*}`.

    Structured units use products of captures; every generic tensor uses the test block's Jacobian
    :math:`J_*` scaled by :math:`P_0^{-1}`, as :math:`J_R (P_0^{-1} J_*^\top)`. The reference
    inputs' captures and their generic Jacobian are each kept in memory when they fit in half the
    budget; otherwise they are recomputed, chunk by chunk, for every block of test points (a
    convolutional network holds megabytes of captures per example: then each test block costs a
    capture pass over the reference inputs, and larger ``memory_budget`` values save passes), and
    the test block's per-example weight gradients are formed once per block
    (:func:`~ntkgp.ntk.tiles.streamed_cross`).

    Parameters
    ----------
    ntk:
        The products engine.
    delta:
        Prior precisions ``(G,)``, fixed.
    reference:
        Reference inputs (training or inducing inputs), or ``None`` for no cross-kernel.
    """

    def __init__(self, ntk: EmpiricalNTK, delta: Tensor, reference: Inputs | None) -> None:
        self.ntk, self.delta, self.reference = ntk, delta, reference
        network, layout = ntk.network, ntk.layout
        plan = ntk.plan(reference)
        self.group_weights = delta.to(torch.float64).reciprocal()
        self.rest = plan.generic
        self.rest_width = layout.width(self.rest)
        #: :math:`P_0^{-1}` on the generically handled columns, ``(P_rest,)``
        self.rest_prior_variance = (
            torch.cat(
                [self.group_weights[g].expand(stop - start) for g, start, stop in layout.column_ranges(self.rest)]
            ).to(network.dtype)
            if self.rest
            else torch.zeros(0, dtype=network.dtype, device=network.device)
        )
        self.reference_size = 0 if reference is None else reference.num * ntk.num_outputs
        #: the reference inputs' captures, ``None`` when they are recomputed per test block
        self.reference_captures: list[UnitCapture] | None = []
        if reference is not None and plan.units:  # held by the engine's cache when the caller put them there
            held = ntk.captures.get(reference)
            if held is not None:
                self.reference_captures = held
            elif captures_fit(ntk, reference, ntk.budget // 2):
                self.reference_captures = captures(ntk, reference)
            else:
                self.reference_captures = None
        self._reference_rest_jacobian: Tensor | None = None
        if (
            reference is not None
            and self.rest
            and self.reference_size * self.rest_width * network.dtype.itemsize <= ntk.budget // 2
        ):
            self._reference_rest_jacobian = generic_jacobian(ntk, reference, self.rest).reshape(-1, self.rest_width)

    def parts(
        self,
        x: Inputs,
        full: bool,
        *,
        prior: bool = True,
        captured: list[UnitCapture] | None = None,
        jac: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """For test inputs ``x``: the prior covariance (dense ``(n*C, n*C)`` if ``full``, else per-point
        blocks ``(n, C, C)``; zeros, not computed, if ``prior`` is False) and the cross-kernel
        ``(M*C, n*C)`` (``None`` without reference inputs). Memory is linear in ``n`` unless ``full``.
        ``captured`` and ``jac`` (the generic columns ``(n, C, P_rest)``) are ``x``'s, when the caller has them."""
        ntk = self.ntk
        C, n, device = ntk.num_outputs, x.num, ntk.network.device
        cross = None
        if self.reference is not None:
            cross = torch.zeros(self.reference_size, n * C, dtype=torch.float64, device=device)
        covariance = torch.zeros(*((n * C, n * C) if full else (n, C, C)), dtype=torch.float64, device=device)
        plan = ntk.plan()
        if captured is None and not full and cross is not None and self.streams(x):
            self._streamed_parts(x, prior, jac, covariance, cross)
            return covariance, cross
        test_captures = captured
        if test_captures is None and plan.units and (prior or cross is not None):
            held = None if differentiable(x) else ntk.captures.get(x)  # e.g. kept by the mean at x
            test_captures = captures(ntk, x) if held is None else held
        if jac is None and self.rest and (prior or cross is not None):
            jac = generic_jacobian(ntk, x, self.rest)  # shape: (n, C, P_rest)
        if test_captures is not None:
            if cross is not None:
                self._structured_cross(test_captures, cross)
            if prior and full:
                structured_gram(ntk, test_captures, test_captures, covariance, weights=self.group_weights)
        if prior and not full:
            covariance += point_blocks(ntk, x, self.group_weights, captured=test_captures, generic_jacobian_cols=jac)
        if jac is not None:
            flat = jac.reshape(-1, self.rest_width)
            scaled = flat * self.rest_prior_variance  # shape: (n*C, P_rest)
            if prior and full:
                covariance += (scaled @ flat.T).to(torch.float64)
            if cross is not None:
                cross += self._reference_rest_cross(scaled)
        return covariance, cross

    def streams(self, x: Inputs) -> bool:
        """Whether :meth:`parts` streams the captures of test blocks ``x`` (when the caller passes none and
        wants per-point prior blocks): the reference inputs are recaptured per block, and the block holds
        its per-example weight gradients (operands, :mod:`ntkgp.ntk.tiles`) rather than its captures,
        so that blocks, and recaptures of the reference inputs, are fewer."""
        return (
            self.reference is not None
            and self.reference_captures is None
            and bool(self.ntk.plan().units)
            and not differentiable(x)
        )

    def _streamed_parts(self, x: Inputs, prior: bool, jac: Tensor | None, covariance: Tensor, cross: Tensor) -> None:
        """:meth:`parts` for a block whose captures are taken chunk by chunk: each chunk's prior blocks and
        gradients, then the reference inputs streamed past the block's operands."""
        ntk = self.ntk
        assert self.reference is not None
        if jac is None and self.rest:
            jac = generic_jacobian(ntk, x, self.rest)  # shape: (n, C, P_rest)

        def each(start: int, xc: Inputs, caps: list[UnitCapture]) -> None:
            if prior:
                cols = None if jac is None else jac[start : start + xc.num]
                blocks = point_blocks(ntk, xc, self.group_weights, captured=caps, generic_jacobian_cols=cols)
                covariance[start : start + xc.num] += blocks

        layout = operand_layout(ntk, self.reference.num, x.num, False)
        held = operands(ntk, x, layout, each)
        desc = "cross-kernel (captures beyond the budget)"
        streamed_cross(ntk, self.reference, held, layout, cross, self.group_weights, desc)
        if jac is not None:
            scaled = jac.reshape(-1, self.rest_width) * self.rest_prior_variance  # shape: (n*C, P_rest)
            cross += self._reference_rest_cross(scaled)

    def _structured_cross(self, test_captures: list[UnitCapture], cross: Tensor) -> None:
        """Add the structured units' cross-kernel ``(M*C, n*C)`` to ``cross``."""
        ntk = self.ntk
        if self.reference_captures is not None:
            structured_gram(ntk, self.reference_captures, test_captures, cross, weights=self.group_weights)
            return
        assert self.reference is not None
        layout = operand_layout(ntk, self.reference.num, test_captures[0].num, False)
        held = operands_of(ntk, test_captures, layout)
        desc = "cross-kernel (captures beyond the budget)"
        streamed_cross(ntk, self.reference, held, layout, cross, self.group_weights, desc)

    def _reference_rest_cross(self, scaled: Tensor) -> Tensor:
        if self._reference_rest_jacobian is not None:
            return (self._reference_rest_jacobian @ scaled.T).to(torch.float64)
        assert self.reference is not None
        parts = [
            generic_jacobian(self.ntk, xr, self.rest).reshape(-1, self.rest_width) @ scaled.T
            for _, xr in self.ntk.network.chunks(self.reference, generic_rows(self.ntk, self.rest), desc="cross-kernel")
        ]
        return torch.cat(parts).to(torch.float64)

    def rows(self, downdate_rank: int, *, streamed: bool = False) -> int:
        """Test points per block so that the cross-kernel, the downdate, a generic Jacobian and the
        block's captures fit half the budget; ``streamed`` (:meth:`streams`, for callers that pass no
        captures to :meth:`parts`): the block's operands instead of its captures."""
        ntk = self.ntk
        C, item = ntk.num_outputs, ntk.network.dtype.itemsize
        generic = self.rest_width * item * 2
        captured = ntk.plan().entries_per_example * item if ntk.plan().units else 0
        if captured and self.reference is not None and self.reference_captures is None:
            # the block's operands for the streamed cross-kernel (and, unless streamed, its captures)
            held = operand_layout(ntk, self.reference.num, self.reference.num, False).entries * item
            captured = held if streamed else captured + held
        per_point = C * (generic + 8 * (self.reference_size + downdate_rank + C)) + captured
        return max(1, ntk.budget // (2 * per_point))
