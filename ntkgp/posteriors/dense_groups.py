r"""Batched joint posteriors of a plain MLP in few tensor operations: the path acquisition functions take.

BoTorch's optimizers evaluate an acquisition function, and its input gradient, hundreds of times on
a few groups of ``q`` points. At those sizes the floating-point work is tiny (for an MLP 6-64-64-1
against 200 training points, about 0.2 MFLOP per group) and the cost is the number of tensor
operations: each costs a few microseconds of dispatch and, with inputs that require grad, an autograd
node in the backward pass. For a plain MLP (:class:`~ntkgp.structured.chain.DenseChain`) every unit
is dense, and with the layer inputs :math:`a_k` and cotangents :math:`g_k` of the test points (the
closed-form captures), :math:`A_k`, :math:`G_k` of the reference inputs :math:`X` and prior weights
:math:`w_{W_k}`, :math:`w_{b_k}`:

.. math::
    K_{X*} &= \sum_k (w_{W_k} A_k a_k^\top + w_{b_k}) \circ (G_k g_k^\top),\\
    K_{bb} &= \sum_k (w_{W_k} a_k a_k^\top + w_{b_k}) \circ (g_k g_k^\top) \quad\text{(within each group)},\\
    J(x)(\bar\theta - \hat\theta) &= \sum_k g_k\,(S_k a_k + s_k),

with :math:`S_k`, :math:`s_k` the weight and bias blocks of the posterior mean's shift
:math:`\bar\theta - \hat\theta`. These are the products the generic route
(:func:`~ntkgp.posteriors.batched.grouped_posterior`) computes through the structured Gram kernels;
here each is one or two operations per layer, and what belongs to the posterior (the reference side
in float64, the shift's blocks, the prior weights) is prepared once and kept with it
(:class:`DenseGroups`): the posterior is rebuilt whenever the hyperparameters or the training data
change, and the network's parameters are a snapshot. The values equal the generic route's to
round-off (``tests/test_dense_chain.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ntkgp.network.finite import check_finite_outputs
from ntkgp.network.inputs import Inputs
from ntkgp.network.passes import network_pass, usable
from ntkgp.posteriors.downdate import DowndatePosterior
from ntkgp.structured.capture import differentiable
from ntkgp.structured.chain import DenseChain

__all__ = ["DenseGroups"]


@dataclass(frozen=True)
class _Layer:
    """One layer's share of the products: its prior weights, reference side and shift blocks."""

    weight_prior: float  # w_W
    bias_prior: Tensor  # w_b, 0-dim float64 (0 without a bias)
    #: the reference inputs' layer inputs ``(N, d_in)`` and cotangents ``(N C, d_out)``, float64
    #: (``None`` without reference inputs)
    reference_inputs: Tensor | None
    reference_cotangents: Tensor | None
    #: :math:`S_k^\top` ``(d_in, d_out)`` and :math:`s_k` ``(d_out,)`` (zeros without a bias) in the network's
    #: dtype, ``None`` when the shift is zero
    shift_weight: Tensor | None
    shift_bias: Tensor | None
    #: the last layer: its cotangents are the identity :math:`I_C` at every input (the products reduce to
    #: :math:`(w_W a\cdot a' + w_b)\,\delta_{cd}`)
    identity: bool


class DenseGroups:
    """The batched posterior of a plain MLP (see the module docstring) for one posterior.

    Build it with :meth:`of`, which keeps it on the posterior and returns ``None`` where the generic
    route applies (a network that is not a plain MLP, reference captures that are recomputed per
    block).
    """

    def __init__(self, posterior: DowndatePosterior, chain: DenseChain) -> None:
        ntk, kernel = posterior.ntk, posterior.kernel
        network = ntk.network
        self.chain = chain  # the posterior is not held: it holds this object
        #: what the prepared values were made from (the posterior's attributes and their versions)
        self.key = _key(posterior)
        index = {name: i for i, name in enumerate(network.names)}
        group, weights = ntk.layout.tensor_group, kernel.group_weights.to(torch.float64)
        offsets = network.offsets
        difference = posterior.weights - network.flat_params.to(torch.float64)
        shift = difference.to(network.dtype) if bool(difference.any()) else None
        references = kernel.reference_captures if kernel.reference is not None else None
        zero = torch.zeros((), dtype=torch.float64, device=network.device)
        self.layers: list[_Layer] = []
        last = len(chain.layers) - 1
        for k, (layer, unit) in enumerate(zip(chain.layers, chain.units)):
            w = index[layer.weight]
            b = None if layer.bias is None else index[layer.bias]
            ref_inputs = ref_cotangents = None
            if references is not None:
                cap = references[unit]
                assert cap.inputs is not None
                ref_inputs = cap.inputs[:, 0].to(torch.float64)  # shape: (N, d_in)
                ref_cotangents = cap.cotangents[:, :, 0].reshape(-1, cap.cotangents.shape[-1]).to(torch.float64)
            shift_weight = shift_bias = None
            if shift is not None:
                d_out, d_in = network.shapes[w]
                shift_weight = shift[offsets[w] : offsets[w + 1]].reshape(d_out, d_in).T
                shift_bias = torch.zeros(d_out, dtype=network.dtype, device=network.device)
                if b is not None:
                    shift_bias = shift[offsets[b] : offsets[b + 1]]
            self.layers.append(
                _Layer(
                    weight_prior=float(weights[group[w]]),
                    bias_prior=zero if b is None else weights[group[b]].clone(),
                    reference_inputs=ref_inputs,
                    reference_cotangents=ref_cotangents,
                    shift_weight=shift_weight,
                    shift_bias=shift_bias,
                    identity=k == last,
                )
            )

    @classmethod
    def of(cls, posterior: DowndatePosterior) -> DenseGroups | None:
        """The fast route's state for ``posterior`` (kept on it), or ``None`` where the generic route applies."""
        chain = posterior.ntk.dense_chain
        kernel = posterior.kernel
        if chain is None or (kernel.reference is not None and kernel.reference_captures is None):
            return None
        held = posterior.dense_groups
        if held is not None and _same(held.key, _key(posterior)):
            return held
        posterior.dense_groups = cls(posterior, chain)
        return posterior.dense_groups

    def __call__(self, posterior: DowndatePosterior, x: Inputs, q: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """Covariances ``(B, qC, qC)``, the mean's shift ``(n, C)`` (``None`` when zero) and the network's
        outputs ``(n, C)`` of ``posterior`` (the one this state was prepared for) for the ``n = B q`` points
        of ``x`` in groups of ``q``, float64 (the shift in the network's dtype), differentiable in ``x``."""
        network = posterior.network
        with network_pass(differentiable(x)):
            data = x.to(network.device, network.dtype).map(usable).data
            inputs, cotangents, out = self.chain.propagate(network.params, data)
        check_finite_outputs(out)
        n, C = out.shape
        groups = n // q
        cross: Tensor | None = None
        prior: Tensor | None = None
        shift: Tensor | None = None
        eye = torch.eye(C, dtype=torch.float64, device=network.device) if C > 1 else None
        for layer, a, g in zip(self.layers, inputs, cotangents):
            a64, g64 = a.to(torch.float64), g.to(torch.float64)
            d_in, d_out = a.shape[-1], g.shape[-1]
            if layer.reference_inputs is not None and layer.reference_cotangents is not None:
                N = layer.reference_inputs.shape[0]
                # shape: (N, d_in) @ (d_in, n) -> (N, n)
                aa = torch.addmm(layer.bias_prior, layer.reference_inputs, a64.T, alpha=layer.weight_prior)
                if C == 1 and layer.identity:
                    term = aa
                elif layer.identity:  # shape: (N, C, n, C)
                    term = (aa[:, None, :, None] * eye[:, None, :]).view(N * C, n * C)  # type: ignore[index]
                else:  # shape: (N C, d_out) @ (d_out, n C) -> (N C, n C)
                    gg = layer.reference_cotangents @ g64.reshape(n * C, d_out).T
                    if C == 1:
                        term = gg * aa
                    else:
                        term = (gg.view(N, C, n, C) * aa[:, None, :, None]).view(N * C, n * C)
                cross = term if cross is None else cross + term
            if posterior.prior_residual:
                ab = a64.reshape(groups, q, d_in)
                aa = torch.baddbmm(layer.bias_prior, ab, ab.mT, alpha=layer.weight_prior)  # shape: (B, q, q)
                if C == 1 and layer.identity:
                    term = aa
                elif layer.identity:  # shape: (B, q, C, q, C)
                    term = (aa[:, :, None, :, None] * eye[:, None, :]).view(groups, q * C, q * C)  # type: ignore[index]
                else:
                    gb = g64.reshape(groups, q * C, d_out)
                    gg = gb @ gb.mT  # shape: (B, qC, qC)
                    if C == 1:
                        term = gg * aa
                    else:
                        term = (gg.view(groups, q, C, q, C) * aa[:, :, None, :, None]).view(groups, q * C, q * C)
                prior = term if prior is None else prior + term
            if layer.shift_weight is not None and layer.shift_bias is not None:
                t = torch.addmm(layer.shift_bias, a, layer.shift_weight)  # shape: (n, d_out)
                part = t if layer.identity else (g * t[:, None, :]).sum(-1)  # shape: (n, C)
                shift = part if shift is None else shift + part
        cov = prior
        if cov is None:
            cov = torch.zeros(groups, q * C, q * C, dtype=torch.float64, device=network.device)
        for sign, v in posterior._terms(x, cross):
            vb = v.reshape(v.shape[0], groups, q * C).transpose(0, 1)  # shape: (B, r, qC)
            cov = torch.baddbmm(cov, vb.mT, vb, alpha=sign)
        return cov, shift, out


def _key(posterior: DowndatePosterior) -> tuple[object, ...]:
    """What :class:`DenseGroups` is prepared from: the posterior's weights, reference captures and prior
    weights (the objects, held so that they stay distinct, and their tensors' versions)."""
    kernel = posterior.kernel
    refs = kernel.reference_captures
    tensors = [posterior.weights, kernel.group_weights]
    tensors += [t for c in refs or [] for t in (c.inputs, c.cotangents) if t is not None]
    return (refs, *tensors, *(t._version for t in tensors))


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Whether two keys of :func:`_key` hold the same objects and versions."""
    return len(a) == len(b) and all(u is v or (type(u) is int and u == v) for u, v in zip(a, b))
