"""Predictive quality: negative log likelihood, calibration error, accuracy / RMSE, and OOD AUROC."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: equal-width confidence bins of the ECE
ECE_BINS = 15


def class_nll(probs: Tensor, y: Tensor) -> float:
    """Mean ``-log p(y)`` of class probabilities ``(N, K)`` at labels ``(N,)``."""
    return float(-probs.gather(1, y.long().unsqueeze(1)).clamp_min(1e-300).log().mean())


def ece(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error of class probabilities ``(N, K)``, ``bins`` equal-width bins."""
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    idx = torch.clamp((conf * bins).long(), max=bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    acc = torch.bincount(idx, weights=correct, minlength=bins) / count.clamp_min(1)
    mean_conf = torch.bincount(idx, weights=conf.double(), minlength=bins) / count.clamp_min(1)
    return float((count / count.sum() * (acc - mean_conf).abs()).sum())


def accuracy(probs: Tensor, y: Tensor) -> float:
    return float((probs.argmax(1) == y).double().mean())


def entropy(probs: Tensor) -> Tensor:
    """Predictive entropy per point, ``(N,)``."""
    return -(probs * probs.clamp_min(1e-300).log()).sum(1)


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """Area under the ROC curve separating ``out_scores`` (positives, should be larger) from ``in_scores``.

    The Mann-Whitney statistic with ties counted half.
    """
    s_in, s_out = in_scores.double().reshape(-1), out_scores.double().reshape(-1)
    greater = (s_out[:, None] > s_in[None, :]).double().sum()
    ties = (s_out[:, None] == s_in[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (s_in.numel() * s_out.numel()))


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> float:
    """Mean negative log density of ``y`` under ``N(mean, var)`` per point."""
    return float(0.5 * (math.log(2 * math.pi) + var.log() + (y - mean).square() / var).mean())


def rmse(mean: Tensor, y: Tensor) -> float:
    return float((mean - y).square().mean().sqrt())


def regression_ece(mean: Tensor, var: Tensor, y: Tensor, levels: int = 9) -> float:
    """Mean absolute gap between nominal and observed coverage of central intervals at 0.1, ..., 0.9."""
    sd = var.sqrt()
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    gaps = []
    for k in range(1, levels + 1):
        level = k / (levels + 1)
        half = normal.icdf(torch.tensor(0.5 + level / 2, dtype=torch.float64))
        covered = ((y - mean).abs() <= half * sd).double().mean()
        gaps.append(abs(float(covered) - level))
    return sum(gaps) / len(gaps)
