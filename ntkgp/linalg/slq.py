r"""Stochastic Lanczos quadrature (SLQ) for :math:`\log|A|` from preconditioned CG runs.

With a preconditioner :math:`P = R R^\top` and probes :math:`w_i` with
:math:`\mathbb E[w w^\top] = I` (Rademacher: entries :math:`\pm 1`),

.. math::
    \log|A| = \log|P| + \operatorname{tr}\log \hat A,\qquad \hat A = R^{-1} A R^{-\top},\qquad
    \operatorname{tr}\log\hat A \approx \frac1s\sum_i \lVert w_i\rVert^2\, e_1^\top \log(T_i)\, e_1,

where :math:`T_i` is the Lanczos tridiagonal of :math:`\hat A` from :math:`w_i/\lVert w_i\rVert`,
read off the CG run on :math:`A z_i` with :math:`z_i = R w_i` and preconditioner :math:`P`
(:func:`ntkgp.linalg.cg.lanczos_tridiagonal`). The quadrature
:math:`e_1^\top \log(T) e_1 = \sum_j (Y_{0j})^2 \log\theta_j` (:math:`T = Y\Theta Y^\top`) is Gauss
quadrature of :math:`w^\top \log(\hat A) w`, exact once the Krylov space is invariant.

The Hutchinson estimator is unbiased; with Rademacher probes its variance per probe is
:math:`2(\lVert \log\hat A\rVert_F^2 - \sum_j (\log\hat A)_{jj}^2)`, small when the
preconditioner is good (:math:`\hat A \approx I`). :func:`slq_log_det` returns the sample
standard error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntkgp.linalg.cg import CGResult, lanczos_tridiagonal

__all__ = ["gauss_quadrature_log", "rademacher", "slq_log_det"]


def rademacher(size: int, count: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``count`` Rademacher probes (entries :math:`\\pm 1`), ``(size, count)``, float64."""
    bits = torch.randint(0, 2, (size, count), generator=generator, dtype=torch.int64)
    return (2.0 * bits - 1.0).to(dtype=torch.float64, device=device)


def gauss_quadrature_log(tridiagonal: Tensor) -> Tensor:
    r""":math:`e_1^\top \log(T)\, e_1` for a symmetric positive definite ``T`` ``(k, k)`` (scalar)."""
    values, vectors = torch.linalg.eigh(tridiagonal)
    return (vectors[0].square() * values.clamp_min(torch.finfo(values.dtype).tiny).log()).sum()


def slq_log_det(cg: CGResult, columns: slice, probe_norms_sq: Tensor) -> tuple[Tensor, Tensor]:
    r"""Estimate :math:`\operatorname{tr}\log\hat A` from the probe columns of a CG run.

    Parameters
    ----------
    cg:
        The CG run; ``columns`` selects its probe columns (right-hand sides :math:`R w_i`).
    probe_norms_sq:
        :math:`\lVert w_i\rVert^2` per probe, ``(s,)``.

    Returns
    -------
    (estimate, standard_error)
        The mean of the per-probe estimates :math:`\lVert w_i\rVert^2 e_1^\top\log(T_i)e_1` and
        its sample standard error (``0`` for a single probe), both scalars.
    """
    steps = cg.iterations[columns]
    a, b = cg.step_sizes[:, columns], cg.updates[:, columns]
    per_probe = (
        torch.stack(
            [
                gauss_quadrature_log(lanczos_tridiagonal(a[:, i], b[:, i], int(k)))
                if int(k) > 0
                else torch.zeros((), dtype=torch.float64, device=a.device)
                for i, k in enumerate(steps.tolist())
            ]
        )
        * probe_norms_sq
    )  # shape: (s,)
    s = per_probe.numel()
    error = per_probe.std() / s**0.5 if s > 1 else torch.zeros((), dtype=torch.float64)
    return per_probe.mean(), error
