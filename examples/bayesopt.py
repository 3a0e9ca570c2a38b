r"""Bayesian optimisation of Branin with a small MLP surrogate, as a BoTorch model.

What it shows
-------------
1. Each round, a 2-64-64-1 tanh MLP (float64) is trained to a MAP on the evaluations so far
   (warm-started Adam on standardized targets, inputs scaled to [-1, 1]).
2. The trained net, unchanged, becomes an ``ntkgp.LinearizedGP`` whose prior precision and noise
   are fitted to the optimum of the exact log evidence (``ntkgp.marglik.fit_hyperparameters``), then
   an ``ntkgp.botorch.LinearizedGPModel``.
3. BoTorch's ``qLogNoisyExpectedImprovement`` is maximised with ``optimize_acqf``: the posterior is
   the GP's exact joint posterior over the ``q`` candidates, differentiable in them.
4. The same loop with BoTorch's ``SingleTaskGP`` and random search, from the same initial points;
   ``bayesopt.png`` plots the best value found against the number of evaluations.

Run it with ``.venv/bin/python examples/bayesopt.py`` (``--iterations``, ``--q``, ``--seed``,
``--out``); it needs BoTorch (``pip install ntkgp[botorch]``) and matplotlib and takes a few
minutes on a CPU. ``--smoke`` shrinks the run (:data:`SMOKE`) for a seconds-long test through
the same code. ``benchmarks/bayesopt.py`` measures regret over seeds on Hartmann-6.
"""

from __future__ import annotations

import argparse
import time
import warnings

import gpytorch
import matplotlib
import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.model import Model
from botorch.optim import optimize_acqf
from botorch.test_functions import Branin
from botorch.utils.sampling import draw_sobol_samples
from torch import Tensor, nn

import ntkgp
from ntkgp.botorch import LinearizedGPModel

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: ``--smoke``: option values of a seconds-long run through the same code (the test suite runs it)
SMOKE = {"iterations": 2, "initial": 5, "width": 8, "map_steps": 20, "restarts": 2, "raw_samples": 16}
PRIOR, NOISE = 1.0, 0.05  # the MAP objective's weight decay and noise variance (standardized targets)


def train_map(net: nn.Module, x: Tensor, y: Tensor, steps: int) -> nn.Module:
    r"""Adam on :math:`\lVert y - f\rVert^2/(2\sigma_0^2) + \delta_0\lVert\theta\rVert^2/2`."""
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        theta = torch.cat([p.reshape(-1) for p in net.parameters()])
        loss = (net(x)[:, 0] - y).square().sum() / (2 * NOISE) + 0.5 * PRIOR * theta.square().sum()
        loss.backward()
        opt.step()
    return net.eval()


class UnitCube(Model):
    """The surrogate of inputs ``2 x - 1`` as a model of ``x`` in the unit cube (what ``optimize_acqf`` searches)."""

    def __init__(self, inner: LinearizedGPModel) -> None:
        super().__init__()
        self.inner = inner

    @property
    def num_outputs(self) -> int:
        return self.inner.num_outputs

    @property
    def batch_shape(self) -> torch.Size:
        return self.inner.batch_shape

    def posterior(self, X: Tensor, *args, **kwargs):
        return self.inner.posterior(2 * X - 1, *args, **kwargs)


def ntkgp_surrogate(net: nn.Module, x: Tensor, y: Tensor) -> Model:
    """The linearized-Laplace GP of the trained net, prior precision and noise fitted on its evidence."""
    lik = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-6)).double()
    lik.noise = NOISE
    gp = ntkgp.LinearizedGP(net, lik, 2 * x - 1, y, prior_precision=PRIOR)
    ntkgp.marglik.fit_hyperparameters(gp)  # L-BFGS to the evidence's optimum
    return UnitCube(LinearizedGPModel(gp.eval()))


def run(method: str, f: Branin, x: Tensor, args: argparse.Namespace) -> tuple[Tensor, float]:
    """Best value found after each evaluation, and the mean seconds per iteration."""
    y = -f(x)  # maximise -Branin
    bounds = torch.stack([torch.zeros(2), torch.ones(2)]).double()
    torch.manual_seed(args.seed)
    net = nn.Sequential(
        nn.Linear(2, args.width), nn.Tanh(), nn.Linear(args.width, args.width), nn.Tanh(), nn.Linear(args.width, 1)
    ).double()
    start = time.perf_counter()
    for it in range(args.iterations):
        if method == "random":
            new = torch.rand(args.q, 2, dtype=torch.float64)
        else:
            ys = (y - y.mean()) / y.std()
            if method == "ntkgp":
                net = train_map(net, 2 * x - 1, ys, args.map_steps * (4 if it == 0 else 1))
                model = ntkgp_surrogate(net, x, ys)
            else:
                model = SingleTaskGP(x, ys[:, None])
                fit_gpytorch_mll(gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model))
            acq = qLogNoisyExpectedImprovement(model, x, cache_root=method == "stgp")
            new = optimize_acqf(acq, bounds, q=args.q, num_restarts=args.restarts, raw_samples=args.raw_samples)[0]
        x, y = torch.cat([x, new.detach()]), torch.cat([y, -f(new.detach())])
    seconds = (time.perf_counter() - start) / max(1, args.iterations)
    return torch.cummax(y, 0).values, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--q", type=int, default=2, help="points per iteration (joint qLogNEI)")
    parser.add_argument("--initial", type=int, default=6)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--map-steps", type=int, default=200)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--raw-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bayesopt.png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE) for a seconds-long test run")
    args = parser.parse_args()
    if args.smoke:  # the SMOKE values replace the defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*cache_root.*")
    f = Branin().double()
    bounds = f.bounds.double()

    class Scaled(Branin):  # Branin on the unit square
        def evaluate_true(self, X: Tensor) -> Tensor:
            return f.evaluate_true(bounds[0] + X * (bounds[1] - bounds[0]))

    g = Scaled().double()
    x0 = draw_sobol_samples(torch.stack([torch.zeros(2), torch.ones(2)]).double(), n=args.initial, q=1, seed=args.seed)
    x0 = x0[:, 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    optimum = -0.397887
    for method, label in (("ntkgp", "ntkgp MLP surrogate"), ("stgp", "SingleTaskGP"), ("random", "random search")):
        best, seconds = run(method, g, x0.clone(), args)
        print(f"{label:22s} best {float(best[-1]):.4f} (optimum {optimum}), {seconds:.2f} s per iteration")
        ax.plot(range(1, len(best) + 1), best.numpy(), label=label)
    ax.axhline(optimum, color="k", lw=0.8, ls="--", label="optimum")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best -Branin found")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
