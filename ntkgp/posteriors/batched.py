r"""Joint covariances over groups of ``q`` test points: GPyTorch's batched inputs ``(*batch, q, d)``.

A batched input holds ``B = prod(batch)`` independent groups of ``q`` points; GPyTorch (and BoTorch's
acquisition functions) want the joint ``qC x qC`` covariance of each group, never the covariance
between groups. With the ``n = B q`` points in group-major order, this module computes

.. math::
    \Sigma_b = K_{bb} - V_b^\top V_b \;(+\, U_b^\top U_b) \quad\text{(kernel space, inducing, low rank)},\qquad
    \Sigma_b = V_b^\top V_b,\ V_b = T^{-1} J_b^\top \quad\text{(weight space, } A = TT^\top\text{)},

``(B, qC, qC)``: the prior blocks :math:`K_{bb}` within groups only (:func:`group_prior`, a batched
version of the per-point blocks of :mod:`ntkgp.ntk.diagonal`) and per-group products of the
downdates. Cost and memory are linear in ``B``: the ``(BqC)^2`` matrix is never formed. Every
step is differentiable in the test inputs when they require grad (captures keep their graph).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.network.inputs import Inputs
from ntkgp.ntk import EmpiricalNTK, jacobian
from ntkgp.ntk.captures import captures_with_outputs
from ntkgp.ntk.diagonal import group_blocks
from ntkgp.ntk.generic import generic_jacobian
from ntkgp.posteriors.base import Posterior
from ntkgp.posteriors.dense_groups import DenseGroups
from ntkgp.posteriors.downdate import DowndatePosterior
from ntkgp.posteriors.prior_kernel import PriorKernel
from ntkgp.posteriors.weight_space import WeightSpacePosterior
from ntkgp.structured.capture import UnitCapture
from ntkgp.structured.products import unit_pushforward

__all__ = ["group_prior", "grouped_covariance", "grouped_posterior", "grouped_prior_covariance"]


def group_prior(
    kernel: PriorKernel, x: Inputs, q: int, captured: list[UnitCapture] | None, jac: Tensor | None
) -> Tensor:
    r"""Prior covariance within groups, :math:`\sum_g \delta_g^{-1} J_g(x_b) J_g(x_b)^\top`, ``(B, qC, qC)``.

    ``captured`` are ``x``'s captures (``None`` when the plan has no structured units) and ``jac`` the
    generic columns ``(n, C, P_rest)`` (``None`` when every tensor is structured).
    """
    ntk = kernel.ntk
    C, groups = ntk.num_outputs, x.num // q
    out = torch.zeros(groups, q * C, q * C, dtype=torch.float64, device=ntk.network.device)
    weights = kernel.group_weights
    if captured is not None:
        for unit, cap in zip(ntk.plan().units, captured):
            group_blocks(ntk, unit, cap, weights, groups, q, out)
    if jac is not None:
        flat = jac.reshape(-1, kernel.rest_width)
        scaled = (flat * kernel.rest_prior_variance).reshape(groups, q * C, -1)
        out += (scaled @ flat.reshape(groups, q * C, -1).mT).to(torch.float64)
    return out


def _test_parts(kernel: PriorKernel, x: Inputs) -> tuple[list[UnitCapture] | None, Tensor | None, Tensor | None]:
    """``x``'s captures (``None`` without structured units), generic columns ``(n, C, P_rest)`` (``None``
    without generic tensors) and the network's outputs ``(n, C)`` from the capture pass (``None`` without one)."""
    ntk = kernel.ntk
    caps, outputs = captures_with_outputs(ntk, x) if ntk.plan().units else (None, None)
    jac = generic_jacobian(ntk, x, kernel.rest) if kernel.rest else None
    return caps, jac, outputs


def _blocks_of(x: Inputs, q: int, points: int) -> list[Inputs]:
    """``x`` in blocks of whole groups, about ``points`` points each (at least one group)."""
    size = max(1, points // q) * q
    return [x[start : start + size] for start in range(0, x.num, size)]


def _shift_vector(posterior: Posterior) -> Tensor | None:
    r""":math:`\bar\theta - \hat\theta` ``(P,)`` in the network's dtype, ``None`` when zero (Laplace)."""
    shift = posterior.weights - posterior.network.flat_params.to(torch.float64)
    return shift.to(posterior.network.dtype) if shift.any() else None


def _structured_shift(kernel: PriorKernel, shift: Tensor, caps: list[UnitCapture] | None, jac: Tensor | None) -> Tensor:
    r""":math:`J(x)(\bar\theta - \hat\theta)` ``(n, C)`` from the block's captures and generic columns (no pass)."""
    ntk = kernel.ntk
    offsets = ntk.network.offsets
    out = None
    if caps is not None:
        for unit, cap in zip(ntk.plan().units, caps):
            tangents = {i: shift[offsets[i] : offsets[i + 1]].unsqueeze(0) for i in unit.tensors}
            part = unit_pushforward(unit, cap, tangents)
            if part is not None:
                out = part[0] if out is None else out + part[0]
    if jac is not None:
        rest = torch.cat([shift[offsets[i] : offsets[i + 1]] for i in kernel.rest])
        part = jac @ rest.to(jac.dtype)  # shape: (n, C)
        out = part if out is None else out + part
    assert out is not None
    return out.to(torch.float64)


def _downdate_groups(posterior: DowndatePosterior, x: Inputs, q: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Covariances ``(B, qC, qC)``, the mean's shift ``(n, C)`` (``None`` when zero) and the network's
    outputs ``(n, C)`` from the capture passes (``None`` when the plan has no structured unit)."""
    kernel = posterior.kernel
    C = posterior.ntk.num_outputs
    dense = DenseGroups.of(posterior)
    if dense is not None:  # a plain MLP: few operations per block, the posterior's side prepared once
        return _joined([dense(posterior, xb, q) for xb in _blocks_of(x, q, kernel.rows(posterior.rank))])
    shift = _shift_vector(posterior)
    parts, shifts, outputs = [], [], []
    for xb in _blocks_of(x, q, kernel.rows(posterior.rank)):
        groups = xb.num // q
        caps, jac, out = _test_parts(kernel, xb)
        if out is not None:
            outputs.append(out)
        if shift is not None:
            shifts.append(_structured_shift(kernel, shift, caps, jac))
        if posterior.prior_residual:
            cov = group_prior(kernel, xb, q, caps, jac)
        else:
            cov = torch.zeros(groups, q * C, q * C, dtype=torch.float64, device=posterior.network.device)
        cross = kernel.parts(xb, full=False, prior=False, captured=caps, jac=jac)[1]
        terms = [(-1.0, posterior.downdate(xb, cross))] if posterior.prior_residual else []
        up = posterior.update(xb, cross)
        if up is not None:
            terms.append((1.0, up))
        for sign, v in terms:
            v = v.reshape(v.shape[0], groups, q * C)  # shape: (r, B, qC)
            cov = cov + sign * torch.einsum("rbi,rbj->bij", v, v)
        parts.append(cov)
    return torch.cat(parts), (torch.cat(shifts) if shifts else None), (torch.cat(outputs) if outputs else None)


def _joined(blocks: list[tuple[Tensor, Tensor | None, Tensor]]) -> tuple[Tensor, Tensor | None, Tensor]:
    """The per-block results of :class:`DenseGroups` concatenated (the shift in float64)."""
    if len(blocks) == 1:
        cov, shift, out = blocks[0]
        return cov, (None if shift is None else shift.to(torch.float64)), out
    shifts = [b[1] for b in blocks if b[1] is not None]
    return (
        torch.cat([b[0] for b in blocks]),
        torch.cat(shifts).to(torch.float64) if shifts else None,
        torch.cat([b[2] for b in blocks]),
    )


def _weight_space_groups(posterior: WeightSpacePosterior, x: Inputs, q: int) -> tuple[Tensor, Tensor | None]:
    network, C = posterior.network, posterior.ntk.num_outputs
    P = network.num_parameters
    shift = _shift_vector(posterior)
    parts, shifts = [], []
    for xb in _blocks_of(x, q, posterior.rows_per_block(P)):
        jac = torch.cat([jacobian(posterior.ntk, xc) for _, xc in xb.chunks(network.chunk_size())])
        if shift is not None:
            shifts.append((jac @ shift.to(jac.dtype)).to(torch.float64))
        cols = jac.reshape(-1, P).T.to(torch.float64)  # shape: (P, B q C)
        v = posterior.whiten(cols)  # shape: (P, B q C), V^T V = J_b A^-1 J_b^T
        v = v.reshape(P, xb.num // q, q * C)  # shape: (P, B, qC)
        parts.append(torch.einsum("pbi,pbj->bij", v, v))
    return torch.cat(parts), (torch.cat(shifts) if shifts else None)


def grouped_posterior(posterior: Posterior, x: Inputs, q: int) -> tuple[Tensor, Tensor]:
    """Predictive mean ``(x.num, C)`` and joint covariances of consecutive groups of ``q`` points,
    ``(x.num // q, qC, qC)``, both float64.

    Rows within a group are point-major (row ``i * C + c`` is output ``c`` of point ``i``), as
    GPyTorch's interleaved multitask distributions want. The mean is :math:`f(x)` plus the
    weight shift pushed forward through the captures (or Jacobian) the covariance is built from, no
    jvp; :math:`f(x)` comes from the same capture passes where there are any (else one forward pass).
    """
    if x.num % q:
        raise ValueError(f"{x.num} test points do not split into groups of {q}")
    outputs = None
    if isinstance(posterior, WeightSpacePosterior):
        cov, shift = _weight_space_groups(posterior, x, q)
    elif isinstance(posterior, DowndatePosterior):
        cov, shift, outputs = _downdate_groups(posterior, x, q)
    else:
        raise NotImplementedError(f"grouped covariances of a {type(posterior).__name__}")
    mean = (posterior.network.forward(x) if outputs is None else outputs).to(torch.float64)
    return (mean if shift is None else mean + shift), cov


def grouped_covariance(posterior: Posterior, x: Inputs, q: int) -> Tensor:
    """The covariances of :func:`grouped_posterior`, ``(x.num // q, qC, qC)``."""
    return grouped_posterior(posterior, x, q)[1]


def grouped_prior_covariance(ntk: EmpiricalNTK, delta: Tensor, x: Inputs, q: int) -> Tensor:
    """The prior NTK within consecutive groups of ``q`` points, ``(x.num // q, qC, qC)`` (prior mode)."""
    kernel = PriorKernel(ntk, delta, None)
    blocks = [group_prior(kernel, xb, q, *_test_parts(kernel, xb)[:2]) for xb in _blocks_of(x, q, kernel.rows(0))]
    return torch.cat(blocks)
