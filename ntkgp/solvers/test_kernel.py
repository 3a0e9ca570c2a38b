r"""The prior NTK at test inputs, and its cross-covariance with fixed reference inputs.

Every posterior in :mod:`ntkgp.solvers` has predictive covariance

.. math::
    \Sigma_{**} = K_{**} - V^\top V,

where :math:`K_{**}` is the prior NTK at the test inputs and :math:`V` ``(r, n_* C)`` is a
downdate. The exact kernel-space posterior takes :math:`V = L^{-1} B^\top K_{X*}`, the inducing
posterior :math:`V = F^\top K_{Z*}`, the low-rank posteriors :math:`V = (J_* W)^\top`.
:class:`TestKernel` computes :math:`K_{**}` (dense or as per-point ``C x C`` blocks) and
:math:`K_{R*}` against reference inputs :math:`R` in one pass; :class:`DowndatePosterior`
turns a downdate into the covariance methods.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from ntkgp.functional import FunctionalNetwork
from ntkgp.gram import structured_gram
from ntkgp.operators.ntk_linear_operator import NTKLinearOperator
from ntkgp.parameter_groups import ParameterGroups
from ntkgp.solvers.base import Posterior

__all__ = ["DowndatePosterior", "TestKernel"]


class TestKernel:
    r"""Prior blocks :math:`K_{**}` at test inputs and the cross-kernel :math:`K_{R*}`.

    ``nn.Linear`` (and other structured) layers use structured products of layer factors (the
    reference inputs' factors are cached); every other parameter tensor uses the test block's
    Jacobian :math:`J_*` scaled by :math:`P_0^{-1}`, as :math:`J_R (P_0^{-1} J_*^\top)`. That
    reference Jacobian is kept in memory when it fits in half the budget.

    Parameters
    ----------
    network, groups:
        The linearized network and its prior groups.
    delta:
        Prior precisions ``(G,)``, fixed.
    reference:
        Reference inputs ``(M, D)`` (training or inducing inputs), or ``None`` for no cross-kernel.
    budget:
        Bytes for Jacobian blocks.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, delta: Tensor, reference: Tensor | None, budget: int
    ) -> None:
        self.network, self.groups, self.delta, self.reference, self.budget = network, groups, delta, reference, budget
        self.group_weights = delta.to(torch.float64).reciprocal()
        self.rest = network.generic_tensors
        self.rest_width = sum(network.numels[t] for t in self.rest)
        per_param = groups.expand(delta.reciprocal(), network.numels).to(network.dtype)
        #: :math:`P_0^{-1}` on the generically handled columns, ``(P_rest,)``
        self.rest_prior_variance = torch.cat(
            [per_param[network.offsets[t] : network.offsets[t + 1]] for t in self.rest]
        ) if self.rest else per_param[:0]
        self.reference_size = 0 if reference is None else reference.shape[0] * network.num_outputs
        self.reference_factors = (network.structured_factors(reference)
                                  if reference is not None and network.structured_layers else [])
        self._reference_rest_jacobian: Tensor | None = None
        if (reference is not None and self.rest
                and self.reference_size * self.rest_width * network.dtype.itemsize <= budget // 2):
            self._reference_rest_jacobian = network.jacobian_block(reference, self.rest).reshape(-1, self.rest_width)

    def parts(self, x: Tensor, full: bool, *, prior: bool = True) -> tuple[Tensor, Tensor | None]:
        """For test inputs ``x`` ``(n, D)``: the prior covariance (dense ``(n*C, n*C)`` if ``full``,
        else per-point blocks ``(n, C, C)``; zeros, not computed, if ``prior`` is False) and the
        cross-kernel ``(M*C, n*C)`` (``None`` without reference inputs). Memory is linear in ``n``
        unless ``full``."""
        network = self.network
        C = network.num_outputs
        n, device = x.shape[0], network.device
        cross = None
        if self.reference is not None:
            cross = torch.zeros(self.reference_size, n * C, dtype=torch.float64, device=device)
        covariance = torch.zeros(*((n * C, n * C) if full else (n, C, C)), dtype=torch.float64, device=device)
        if network.structured_layers:
            test_factors = network.structured_factors(x)
            if cross is not None:
                structured_gram(network, self.groups, self.reference_factors, test_factors, cross,
                                weights=self.group_weights)
            if prior and full:
                structured_gram(network, self.groups, test_factors, test_factors, covariance,
                                weights=self.group_weights)
            elif prior:
                covariance += self._structured_point_blocks(test_factors, n)
        if self.rest and (prior or cross is not None):
            jac = network.jacobian_block(x, self.rest).reshape(-1, self.rest_width)
            scaled = jac * self.rest_prior_variance  # shape: (n*C, P_rest)
            if prior and full:
                covariance += (scaled @ jac.T).to(torch.float64)
            elif prior:
                covariance += torch.einsum("ncp,ndp->ncd", scaled.reshape(n, C, -1),
                                           jac.reshape(n, C, -1)).to(torch.float64)
            if cross is not None:
                cross += self._reference_rest_cross(scaled)
        return covariance, cross

    def _reference_rest_cross(self, scaled: Tensor) -> Tensor:
        if self._reference_rest_jacobian is not None:
            return (self._reference_rest_jacobian @ scaled.T).to(torch.float64)
        network = self.network
        rows = max(1, self.budget // (2 * network.num_outputs * self.rest_width * scaled.element_size()))
        parts = [network.jacobian_block(xr, self.rest).reshape(-1, self.rest_width) @ scaled.T
                 for _, xr in network.chunks(self.reference, rows, desc="cross-kernel")]
        return torch.cat(parts).to(torch.float64)

    def _structured_point_blocks(self, factors: list[tuple[Tensor, ...]], n: int, size: int = 64) -> Tensor:
        r"""Per-point ``C x C`` prior blocks of the structured layers.

        ``nn.Linear``: :math:`w_W\lVert a_n\rVert^2 g_n g_n^\top + w_b g_n g_n^\top` for all points
        in one batched product; other structured layers (convolutions) through their
        ``size``-point diagonal Gram blocks.
        """
        C = self.network.num_outputs
        out = torch.zeros(n, C, C, dtype=torch.float64, device=self.network.device)
        weights = self.group_weights
        layers = list(self.network.structured_layers)
        if all(layer.kind == "linear" for layer in layers):
            for layer, (a, g) in zip(layers, factors):
                g = g.to(torch.float64)  # shape: (n, C, d_out)
                gg = torch.einsum("ncd,ned->nce", g, g)
                scale = torch.zeros(n, dtype=torch.float64, device=out.device)
                if layer.weight is not None:
                    norms = a.to(torch.float64).square().sum(-1)  # shape: (n,)
                    scale = scale + weights[self.groups.tensor_group[layer.weight]] * norms
                if layer.bias is not None:
                    scale = scale + weights[self.groups.tensor_group[layer.bias]]
                out += scale[:, None, None] * gg
            return out
        for start in range(0, n, size):
            part = [tuple(t[start : start + size] for t in layer) for layer in factors]
            r = min(size, n - start)
            block = torch.zeros(r * C, r * C, dtype=torch.float64, device=self.network.device)
            structured_gram(self.network, self.groups, part, part, block, weights=weights)
            out[start : start + r] = block.reshape(r, C, r, C).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return out

    def rows(self, downdate_rank: int) -> int:
        """Test points per block so that the cross-kernel, the downdate and a generic Jacobian fit
        half the budget."""
        network = self.network
        C = network.num_outputs
        per_point = C * (self.rest_width * network.dtype.itemsize * 2 + 8 * (self.reference_size + downdate_rank + C))
        return max(1, self.budget // (2 * per_point))

    def prior_operator(self, x1: Tensor, x2: Tensor) -> NTKLinearOperator:
        """The lazy prior NTK between ``x1`` and ``x2``."""
        return NTKLinearOperator(x1, x2, self.delta, network=self.network, groups=self.groups, budget=self.budget)


class DowndatePosterior(Posterior):
    r"""A posterior with covariance :math:`K_{**} - V^\top V + U^\top U` (see the module docstring).

    Subclasses give :meth:`downdate` (:math:`V`) and optionally :meth:`update` (:math:`U`, for
    differences of two projections such as the inducing posterior's
    :math:`K_{*Z}(K_{ZZ}^{-1} - D^{-1})K_{Z*}`); ``reference`` names the inputs they need the
    cross-kernel against (``None`` when they need none).
    """

    def __init__(
        self, network: FunctionalNetwork, groups: ParameterGroups, weights: Tensor, budget: int, delta: Tensor,
        reference: Tensor | None, rank: int, *, prior_residual: bool = True,
    ) -> None:
        super().__init__(network, groups, weights, budget)
        self.delta = delta
        self.kernel = TestKernel(network, groups, delta, reference, budget)
        #: rows of :math:`V` plus rows of :math:`U`
        self.rank = rank
        #: ``False``: the covariance is :math:`U^\top U` alone, without :math:`K_{**} - V^\top V`
        self.prior_residual = prior_residual

    @abstractmethod
    def downdate(self, x: Tensor, cross: Tensor | None) -> Tensor:
        """:math:`V` ``(r, n*C)`` for test inputs ``x`` ``(n, D)``, given the cross-kernel."""

    def update(self, x: Tensor, cross: Tensor | None) -> Tensor | None:
        """:math:`U` ``(r', n*C)``, added back; ``None`` (the default) for none."""
        return None

    def _terms(self, x: Tensor, cross: Tensor | None) -> list[tuple[float, Tensor]]:
        """The signed low-rank terms: ``(-1, V)`` (unless ``prior_residual`` is off) and ``(+1, U)``."""
        terms = [(-1.0, self.downdate(x, cross))] if self.prior_residual else []
        up = self.update(x, cross)
        if up is not None:
            terms.append((1.0, up))
        return terms

    def _parts(self, x: Tensor, full: bool) -> tuple[Tensor, list[tuple[float, Tensor]]]:
        prior, cross = self.kernel.parts(x, full, prior=self.prior_residual)  # zeros without the residual
        return prior, self._terms(x, cross)

    @torch.no_grad()
    def covariance(self, x: Tensor) -> Tensor:
        prior, terms = self._parts(x, full=True)
        for sign, v in terms:
            prior = prior + sign * (v.T @ v)
        return prior

    @torch.no_grad()
    def covariance_blocks(self, x: Tensor) -> Tensor:
        C = self.network.num_outputs
        parts = []
        for _, xb in self.network.chunks(x, self.kernel.rows(self.rank), desc="predictive blocks"):
            prior, terms = self._parts(xb, full=False)
            for sign, v in terms:
                v = v.reshape(v.shape[0], xb.shape[0], C)
                prior = prior + sign * torch.einsum("mnc,mnd->ncd", v, v)
            parts.append(prior)
        return torch.cat(parts)

    @torch.no_grad()
    def covariance_diagonal(self, x: Tensor) -> Tensor:
        return self.covariance_blocks(x).diagonal(dim1=-2, dim2=-1).reshape(-1)

    @torch.no_grad()
    def covariance_matmul(self, x: Tensor, rhs: Tensor) -> Tensor:
        rhs = rhs.to(torch.float64)
        out = self.kernel.prior_operator(x, x)._matmul(rhs) if self.prior_residual else torch.zeros_like(rhs)
        # V and U are (r, n*C): kept whole (r per test output, like the result)
        blocks: list[list[tuple[float, Tensor]]] = []
        for _, xb in self.network.chunks(x, self.kernel.rows(self.rank), desc="predictive matmul"):
            blocks.append(self._terms(xb, self.kernel.parts(xb, full=False, prior=False)[1]))
        for term in range(len(blocks[0]) if blocks else 0):
            sign = blocks[0][term][0]
            v = torch.cat([b[term][1] for b in blocks], dim=1)
            out = out + sign * (v.T @ (v @ rhs))
        return out
