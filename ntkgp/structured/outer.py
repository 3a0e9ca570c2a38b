r""":math:`J^\top\Lambda J` of one-position dense units without per-example Jacobians (the last-layer closed form).

For a dense unit at one position (``nn.Linear`` on ``(n, d_in)``, a network's last layer above all)
the per-example Jacobian of its weight is :math:`G_n \otimes a_n^\top` and of its bias :math:`G_n`,
with :math:`G_n` ``(C, d_out)`` the output cotangents. With :math:`M_n = B_n^\top G_n`
(:math:`\Lambda_n = B_nB_n^\top`) and features :math:`\phi_n = a_n` (weight) or :math:`1` (bias), the
block of two tensors is

.. math::
    \big(J^\top\Lambda J\big)_{(o,i),(q,j)} = \sum_n \big(M_{u,n}^\top M_{v,n}\big)_{oq}\,\phi_{t,n,i}\,\phi_{t',n,j},

formed as :math:`d_{out}` GEMMs of ``(d_in, n) x (n, d_out' d_in')`` per pair of tensors:
:math:`2 n P_t P_{t'}` flops, ``C`` times fewer than the ``(nC, P)`` Jacobian GEMM. For the last
layer of a classifier (``G_n = I``) this is :math:`\sum_n \Lambda_n \otimes \phi_n\phi_n^\top`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ntkgp.structured.capture import UnitCapture
from ntkgp.structured.plan import Unit

__all__ = ["kronecker_outer"]


def _terms(units: Sequence[Unit], captures: Sequence[UnitCapture], root: Tensor) -> list[tuple[int, Tensor, Tensor]]:
    """Per tensor: ``(θ position, M (n, C, d_out), features (n, d))``, float64."""
    out = []
    for unit, cap in zip(units, captures):
        g = cap.cotangents[:, :, 0].to(torch.float64)  # shape: (n, C, d_out)
        m = torch.einsum("nca,ncd->nad", root.to(torch.float64), g)  # shape: (n, C, d_out)
        if unit.weight is not None:
            assert cap.inputs is not None
            out.append((unit.weight, m, cap.inputs[:, 0].to(torch.float64)))
        if unit.bias is not None:
            out.append((unit.bias, m, torch.ones(g.shape[0], 1, dtype=torch.float64, device=g.device)))
    return out


def kronecker_outer(
    units: Sequence[Unit], captures: Sequence[UnitCapture], hessian_root: Tensor, offsets: Sequence[int], out: Tensor
) -> None:
    r"""Add :math:`J^\top\Lambda J` of ``n`` examples to ``out`` ``(P, P)`` (upper blocks computed, then mirrored).

    ``units`` are one-position dense units covering every tensor of :math:`\theta`; ``offsets`` are
    the tensors' column offsets; ``hessian_root`` ``(n, C, C)``.
    """
    terms = sorted(_terms(units, captures, hessian_root), key=lambda term: term[0])
    for a, (t, m_t, phi_t) in enumerate(terms):
        rows, d_feat = slice(offsets[t], offsets[t + 1]), phi_t.shape[1]
        for t2, m_v, phi_v in terms[a:]:
            cols = slice(offsets[t2], offsets[t2 + 1])
            lam = torch.einsum("nao,naq->noq", m_t, m_v)  # shape: (n, d_out_t, d_out_v)
            n, d_out = lam.shape[:2]
            block = out[rows, cols]
            for o in range(d_out):
                # shape: (n, d_out_v, 1) * (n, 1, d_feat_v) -> (n, d_out_v * d_feat_v)
                right = (lam[:, o, :, None] * phi_v[:, None, :]).reshape(n, -1)
                block[o * d_feat : (o + 1) * d_feat] += phi_t.T @ right
            if t2 != t:
                out[cols, rows] = out[rows, cols].T
