r"""Heteroscedastic regression: aleatoric and epistemic uncertainty from one linearized network.

What it shows
-------------
1-D data :math:`y = \sin(x) + \sigma(x)\,\varepsilon` with noise that grows with :math:`x`,
:math:`\sigma(x) = 0.1 + 0.08\,(x + 3)` (0.1 at the left end, 0.58 at the right), and inputs
drawn uniformly from :math:`[-3, 3]` with a gap, :math:`(0, 1.5)`, left empty. A tanh MLP
(1-16-16-2, float64) outputs the natural parameters of a Gaussian,
:math:`\eta_1 = \mu/\sigma^2` and :math:`\eta_2 = -1/(2\sigma^2)`, formed from a mean head and a
log-precision head (:math:`\eta_2 = -e^{s}/2`, :math:`\eta_1 = -2\eta_2 m`), and
is trained to a MAP of the Gaussian negative log-likelihood in those parameters plus weight
decay :math:`\tfrac{\delta_0}{2}\lVert\theta\rVert^2` (full batch: Adam, then L-BFGS). The
trained network, unchanged, becomes ``ntkgp.LinearizedGP`` with ``NaturalGaussianLikelihood``:
a Laplace GP over :math:`(\eta_1, \eta_2)` at every input. Its prior precision :math:`\delta`
is fitted by the Laplace marginal likelihood (Adam on ``model.parameters()``).

The predictive of :math:`y` is moment-matched. By the law of total variance,
``variance = aleatoric_variance + epistemic_variance``: the aleatoric part
:math:`\mathbb E_\eta[\sigma^2(\eta)]` is the noise the network predicts, the epistemic part
:math:`\mathrm{Var}_\eta[\mu(\eta)]` the uncertainty about the mean from the weight posterior.

How to read the figure
----------------------
* top: data (dots), the true :math:`\sin(x)` (dashed), the predictive mean, the band
  :math:`\pm 2\sqrt{\text{aleatoric}}` (blue: the noise alone) and the band
  :math:`\pm 2\sqrt{\text{aleatoric} + \text{epistemic}}` (total; the orange strips are the width
  the epistemic part adds). Grey shading marks where there is no training data (the gap and
  beyond the data). Inside the data the orange strips are hairlines and the blue band follows
  the growing noise; outside the data they open wide.
* bottom: the two variance parts against :math:`x` on a log scale, with the true noise
  variance :math:`\sigma(x)^2` where the data were drawn. The aleatoric curve tracks the true
  noise; the epistemic curve sits one to two orders of magnitude below it inside the data,
  rises by one to two orders of magnitude in the gap and more outside the data (on the left,
  where the noise is small, it overtakes the aleatoric part).

Delta method vs Monte Carlo
---------------------------
``NaturalGaussianLikelihood(link_approx="delta")`` (the default) forms these moments by a
Taylor expansion of :math:`\mu(\eta) = -\eta_1/(2\eta_2)` and :math:`\sigma^2(\eta) =
-1/(2\eta_2)` around the latent mean (second order for the means, first order for
:math:`\mathrm{Var}[\mu]`); ``link_approx="mc"`` samples the latent Gaussian (here 100000
samples, seeded generator) and discards samples with :math:`\eta_2 \ge 0`. The script prints
both at a few inputs, with the latent coefficient of variation of :math:`\eta_2` ("cv η2",
sd / |mean|) and the latent probability of :math:`\eta_2 \ge 0`. Inside the data (cv about
0.2) they agree: the mean and the aleatoric part to about 1%, the small epistemic part to
within a few tens of per cent (the first-order term misses the rest). In the gap and far
outside the data the latent sd of :math:`\eta_2` becomes comparable with :math:`|\eta_2|`: its
Gaussian reaches near 0 (and past it), where :math:`\mu = -\eta_1/(2\eta_2)` and
:math:`\sigma^2` blow up, so the moments are heavy-tailed; strictly, under a Gaussian over
:math:`\eta_2` the mean of the ratio does not exist at all, and MC only looks tame where it
never draws an :math:`\eta_2` near 0. There the MC moments are dominated by a few extreme
samples, change from seed to seed (and with tiny changes of the MAP), and exceed the delta
values by orders of magnitude; neither is "the" answer there.

Run: ``.venv/bin/python examples/heteroscedastic_regression.py [--out heteroscedastic.png] [--seed 0]``
(about 15-30 s on one CPU core, most of it the MAP fit).
``--smoke`` shrinks data, network, steps and samples (:data:`SMOKE`) for a seconds-long test run through the same code.
"""

from __future__ import annotations

import argparse
import math
import time

import matplotlib
import numpy as np
import torch
from torch import Tensor, nn

import ntkgp
from ntkgp.likelihoods import HeteroscedasticNormal, NaturalGaussianLikelihood

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

X_RANGE = (-3.0, 3.0)
GAP = (0.0, 1.5)
PLOT_RANGE = (-5.5, 5.5)
#: ``--smoke``: option values of a seconds-long run through the same code (the test suite runs it)
SMOKE = {"n": 40, "width": 8, "map_adam_steps": 20, "map_lbfgs_steps": 5, "steps": 5, "mc_samples": 1000}


def noise_sd(x: Tensor) -> Tensor:
    """True noise standard deviation, growing linearly with ``x``."""
    return 0.1 + 0.08 * (x - X_RANGE[0])


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` inputs uniform on ``X_RANGE`` minus ``GAP`` (shape ``(n, 1)``) and noisy targets ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    (lo, hi), (g0, g1) = X_RANGE, GAP
    u = torch.rand(n, generator=g, dtype=torch.float64) * ((hi - lo) - (g1 - g0)) + lo
    x = torch.where(u < g0, u, u + (g1 - g0))  # squeeze the gap out of a uniform draw
    x = x.sort().values
    y = torch.sin(x) + noise_sd(x) * torch.randn(n, generator=g, dtype=torch.float64)
    return x.unsqueeze(-1), y


class NaturalParameterNet(nn.Module):
    r"""MLP whose two outputs are the natural parameters :math:`(\eta_1, \eta_2)` of a Gaussian.

    The body's two heads are the mean :math:`m` and the log precision :math:`s = -\log\sigma^2`;
    the outputs are :math:`\eta_2 = -e^{s}/2` and :math:`\eta_1 = m\,e^{s} = -2\eta_2 m`. (With
    raw heads, :math:`\eta_1 = h_0` and :math:`\eta_2 = -\mathrm{softplus}(h_1)/2`, a noise sd of
    0.1 needs outputs near 100 that weight decay will not allow; this way the heads stay of
    order one and the GP is still over :math:`(\eta_1, \eta_2)`.)
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        precision = h[:, 1].exp()  # 1 / sigma^2
        return torch.stack([h[:, 0] * precision, -precision / 2], -1)


def region(x: float) -> str:
    """Where ``x`` lies relative to the training inputs."""
    if GAP[0] < x < GAP[1]:
        return "gap"
    if X_RANGE[0] <= x <= X_RANGE[1]:
        return "data"
    return "outside"


def compare_links(model: ntkgp.LinearizedGP, points: list[float], n_samples: int, seed: int) -> None:
    """Print delta-method vs Monte Carlo predictive moments at ``points``, with the latent spread of η2."""
    x = torch.tensor(points, dtype=torch.float64).unsqueeze(-1)
    mc = NaturalGaussianLikelihood(link_approx="mc", n_samples=n_samples, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        f = model(x)
        delta_pred: HeteroscedasticNormal = model.likelihood(f)
        mc_pred: HeteroscedasticNormal = mc(f)
        eta2 = f.mean[:, 1]
        sd2 = f.lazy_covariance_matrix.point_blocks()[:, 1, 1].sqrt()
    p_pos = 0.5 * torch.erfc(-eta2 / (sd2 * math.sqrt(2)))  # P(eta2 >= 0) under the latent Gaussian
    print(f"\ndelta method vs Monte Carlo ({n_samples} samples, seed {seed}); η2: latent mean, cv = sd / |mean|")
    header = (
        f"| {'x':>5} | {'where':<7} | {'η2':>9} | {'cv η2':>7} | {'P(η2≥0)':>8} | {'mean δ':>8} "
        f"| {'mean MC':>9} | {'alea δ':>8} | {'alea MC':>9} | {'epi δ':>9} | {'epi MC':>9} |"
    )
    print(header)
    print("".join(c if c == "|" else "-" for c in header))
    for i, xi in enumerate(points):
        print(
            f"| {xi:>5.2f} | {region(xi):<7} | {float(eta2[i]):>9.3g} | {float(sd2[i] / eta2[i].abs()):>7.3f} "
            f"| {float(p_pos[i]):>8.1e} | {float(delta_pred.mean[i]):>8.4f} | {float(mc_pred.mean[i]):>9.4g} "
            f"| {float(delta_pred.aleatoric_variance[i]):>8.4f} | {float(mc_pred.aleatoric_variance[i]):>9.4g} "
            f"| {float(delta_pred.epistemic_variance[i]):>9.3e} | {float(mc_pred.epistemic_variance[i]):>9.3e} |"
        )


def shade_no_data(ax: plt.Axes) -> None:
    """Grey background where there are no training inputs."""
    for a, b in ((PLOT_RANGE[0], X_RANGE[0]), GAP, (X_RANGE[1], PLOT_RANGE[1])):
        ax.axvspan(a, b, color="0.9", zorder=0)


def plot(path: str, x: Tensor, y: Tensor, grid: Tensor, pred: HeteroscedasticNormal, delta: float) -> None:
    """Predictive mean with aleatoric and total bands (top) and the two variance parts (bottom)."""
    g = grid[:, 0].numpy()
    mean = pred.mean.numpy()
    alea, epi = pred.aleatoric_variance.numpy(), pred.epistemic_variance.numpy()
    total_sd, alea_sd = np.sqrt(alea + epi), np.sqrt(alea)
    fig, (ax0, ax1) = plt.subplots(
        2, 1, figsize=(9, 8.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]}, constrained_layout=True
    )
    shade_no_data(ax0)
    lo_total, hi_total = mean - 2 * total_sd, mean + 2 * total_sd
    lo_alea, hi_alea = mean - 2 * alea_sd, mean + 2 * alea_sd
    ax0.fill_between(g, lo_alea, hi_alea, color="C0", alpha=0.25, lw=0, label="±2 sd aleatoric")
    ax0.fill_between(
        g, hi_alea, hi_total, color="C1", alpha=0.45, lw=0, label="±2 sd total: extra width from epistemic"
    )
    ax0.fill_between(g, lo_total, lo_alea, color="C1", alpha=0.45, lw=0)
    ax0.plot(g, mean, color="C0", lw=2, label="predictive mean")
    ax0.plot(g, np.sin(g), "k--", lw=1, label="true sin(x)")
    ax0.scatter(x[:, 0].numpy(), y.numpy(), s=9, color="k", zorder=3, label="training data")
    ax0.set_ylim(-4, 4)
    ax0.set_ylabel("y")
    ax0.set_title(
        f"LinearizedGP, NaturalGaussianLikelihood (delta method), marglik δ = {delta:.3g}\n"
        "grey: no training data (gap and outside)",
        fontsize=10,
    )
    ax0.legend(loc="upper left", fontsize=8, ncol=2)

    shade_no_data(ax1)
    ax1.semilogy(g, alea, color="C0", lw=2, label="aleatoric  E[σ²(η)]")
    ax1.semilogy(g, epi, color="C1", lw=2, label="epistemic  Var[μ(η)]")
    gd = np.linspace(*X_RANGE, 200)
    ax1.semilogy(
        gd,
        noise_sd(torch.as_tensor(gd)).square().numpy(),
        "k--",
        lw=1,
        label="true noise variance σ(x)² (where data were drawn)",
    )
    ax1.set_xlim(*PLOT_RANGE)
    ax1.set_xlabel("x")
    ax1.set_ylabel("variance (log scale)")
    ax1.set_title("the two parts of the predictive variance", fontsize=10)
    ax1.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Train the MAP, build the GP, fit δ, print the tables and write the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="heteroscedastic.png", help="path of the figure (default: heteroscedastic.png)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, init and MC samples (default: 0)")
    parser.add_argument("--width", type=int, default=16, help="hidden units per layer (default: 16)")
    parser.add_argument("--n", type=int, default=160, help="number of training points (default: 160)")
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=1.0,
        help="δ₀: weight decay of the MAP fit and the GP's initial prior precision (default: 1)",
    )
    parser.add_argument("--steps", type=int, default=200, help="Adam steps on the marginal likelihood (default: 200)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate for log δ (default: 0.1)")
    parser.add_argument("--mc-samples", type=int, default=100_000, help="samples of the MC comparison (default: 1e5)")
    parser.add_argument("--map-adam-steps", type=int, default=2000, help="Adam steps of the MAP fit (default: 2000)")
    parser.add_argument(
        "--map-lbfgs-steps", type=int, default=200, help="L-BFGS iterations of the MAP fit (default: 200)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE) for a seconds-long test run")
    args = parser.parse_args(argv)
    if args.smoke:  # the SMOKE values replace the defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    x, y = make_data(args.n, args.seed)
    torch.manual_seed(args.seed)
    net = NaturalParameterNet(args.width).double()
    grad_norm = ntkgp.marglik.train_map(
        net,
        NaturalGaussianLikelihood(),
        x,
        y,
        args.weight_decay,
        adam_steps=args.map_adam_steps,
        lbfgs_steps=args.map_lbfgs_steps,
        tolerance_grad=1e-6,
    )
    net.eval()
    num_params = sum(p.numel() for p in net.parameters())
    print(
        f"data: N = {args.n}, x in {X_RANGE} without {GAP}, noise sd 0.1 -> 0.58; "
        f"MLP 1-{args.width}-{args.width}-2 tanh, P = {num_params}"
    )
    print(
        f"MAP fit with weight decay δ₀ = {args.weight_decay:g}: |grad| = {grad_norm:.1e} "
        f"({time.perf_counter() - start:.1f} s)"
    )

    model = ntkgp.LinearizedGP(net, NaturalGaussianLikelihood(), x, y, prior_precision=args.weight_decay)
    with torch.no_grad():
        before = float(model.log_evidence())
    t0 = time.perf_counter()
    ntkgp.marglik.fit_hyperparameters(model, steps=args.steps, lr=args.lr)
    delta = float(model.prior_precision.detach())
    with torch.no_grad():
        after = float(model.log_evidence())
    print(
        f"solver: {model.solver.name}; log evidence: δ = {args.weight_decay:g}: {before:.3f} -> fitted δ = "
        f"{delta:.4g}: {after:.3f} ({args.steps} Adam steps, {time.perf_counter() - t0:.1f} s)"
    )

    grid = torch.linspace(*PLOT_RANGE, 400, dtype=torch.float64).unsqueeze(-1)
    model.eval()
    with torch.no_grad():
        pred: HeteroscedasticNormal = model.likelihood(model(grid))

    # the numbers behind the figure, at a few inputs
    points = [-5.0, -2.5, -1.0, 0.75, 2.5, 5.0]
    px = torch.tensor(points, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        at = model.likelihood(model(px))
    true_var = [
        f"{float(noise_sd(torch.tensor(v))) ** 2:.4f}" if X_RANGE[0] <= v <= X_RANGE[1] else "-" for v in points
    ]  # the noise law holds where the data were drawn
    print("\npredictive (delta method) at a few inputs")
    header = (
        f"| {'x':>5} | {'where':<7} | {'mean':>8} | {'sin(x)':>8} | {'aleatoric':>9} | {'true σ²':>8} "
        f"| {'epistemic':>9} | {'total sd':>8} |"
    )
    print(header)
    print("".join(c if c == "|" else "-" for c in header))
    for i, xi in enumerate(points):
        print(
            f"| {xi:>5.2f} | {region(xi):<7} | {float(at.mean[i]):>8.4f} | {math.sin(xi):>8.4f} "
            f"| {float(at.aleatoric_variance[i]):>9.4f} | {true_var[i]:>8} "
            f"| {float(at.epistemic_variance[i]):>9.3e} | {float(at.variance[i].sqrt()):>8.4f} |"
        )
    inside = torch.tensor([region(float(v)) == "data" for v in grid[:, 0]])
    ratio = pred.epistemic_variance / pred.aleatoric_variance
    print(
        f"\nepistemic / aleatoric variance on the grid: median {float(ratio[inside].median()):.3g} inside the data, "
        f"{float(ratio[~inside].median()):.3g} in the gap and outside"
    )

    compare_links(model, points, args.mc_samples, args.seed)
    plot(args.out, x, y, grid, pred, delta)
    print(f"\nwrote {args.out}  (total {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
