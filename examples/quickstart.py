r"""Quickstart: a trained MLP on the diabetes data, turned into a Gaussian process.

What it shows
-------------
1. Train a small tanh MLP (10-50-50-1, float64) to a MAP estimate on scikit-learn's bundled
   diabetes regression data (442 patients, 10 features; standardized inputs and targets).
   The training objective is the negative log joint of the linearized-Laplace model,
   :math:`\tfrac{1}{2\sigma_0^2}\lVert y - f(X;\theta)\rVert^2 + \tfrac{\delta_0}{2}\lVert\theta\rVert^2`,
   i.e. weight decay that matches the GP's initial prior precision :math:`\delta_0`.
2. Wrap the trained net, unchanged, as ``ntkgp.LinearizedGP``: an exact GPyTorch GP whose
   kernel is the empirical NTK :math:`J(x)J(x')^\top/\delta` and whose posterior is the
   linearized-Laplace (GGN/GLM) predictive.
3. Fit the prior precision :math:`\delta` and the noise :math:`\sigma` by maximizing the exact
   log marginal likelihood with GPyTorch's ``ExactMarginalLogLikelihood`` and Adam (the
   network weights are not hyperparameters and never move).
4. Compare test NLL / RMSE of (a) the MAP plug-in predictive with a homoscedastic Gaussian
   whose :math:`\sigma` is the training RMSE, (b) the GP before and (c) after fitting the
   hyperparameters, and plot the predictive bands (``quickstart.png``).

Run it with ``bash scripts/quickstart.sh`` (or ``.venv/bin/python examples/quickstart.py``);
``--out`` sets the figure's path, ``--seed`` the split and initialization, ``--steps``/``--lr``
the marginal-likelihood optimization (400 Adam steps at lr 0.1 by default, which converges).
It needs scikit-learn and matplotlib (no downloads) and takes a few seconds on a CPU.
``--smoke`` shrinks data, network and steps (:data:`SMOKE`) for a seconds-long test run through the same code.

On this small, noisy data set (noise dominates: σ ≈ 0.67 in standardized units) the three
predictives score within a few hundredths of a nat of each other, and which one wins depends on
the split (``--seed``); what the GP adds is an input-dependent epistemic variance (the inner
band in the figure) and a marginal likelihood to choose δ and σ with, not a large NLL gain.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import gpytorch
import matplotlib
import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

import ntkgp

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: weight decay of the MAP fit, and the GP's initial prior precision
PRIOR_PRECISION = 10.0
#: noise scale assumed by the MAP objective (the targets are standardized to unit variance)
MAP_NOISE = 1.0
#: ``--smoke``: option values of a seconds-long run through the same code (the test suite runs it)
SMOKE = {"n_train": 40, "width": 8, "map_adam_steps": 20, "map_lbfgs_steps": 5, "steps": 5}


@dataclass
class Data:
    """Standardized train/test split (float64 tensors; targets of shape ``(n,)``)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(seed: int, test_size: float = 0.2, n_train: int | None = None) -> Data:
    """The diabetes data, split with ``seed`` and standardized on the training part (its first
    ``n_train`` rows if given)."""
    x, y = load_diabetes(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed)
    x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    xs = StandardScaler().fit(x_tr)
    ys = StandardScaler().fit(y_tr[:, None])

    def as_tensor(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float64)

    return Data(
        x_train=as_tensor(xs.transform(x_tr)),
        y_train=as_tensor(ys.transform(y_tr[:, None])[:, 0]),
        x_test=as_tensor(xs.transform(x_te)),
        y_test=as_tensor(ys.transform(y_te[:, None])[:, 0]),
    )


def make_net(num_features: int, width: int = 50) -> nn.Sequential:
    """A ``D-width-width-1`` tanh MLP in float64 (the global default dtype is left alone)."""
    return nn.Sequential(
        nn.Linear(num_features, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 1),
    ).double()


def train_map(net: nn.Module, x: Tensor, y: Tensor, adam_steps: int = 1000, lbfgs_steps: int = 50) -> list[float]:
    r"""Full-batch MAP fit: Adam, then a few L-BFGS iterations, on the negative log joint
    :math:`\tfrac{1}{2\sigma_0^2}\lVert y-f\rVert^2 + \tfrac{\delta_0}{2}\lVert\theta\rVert^2`
    (divided by N). Returns the objective after each phase."""
    params = list(net.parameters())

    def objective() -> Tensor:
        resid = y - net(x).squeeze(-1)
        weight_norm = sum(p.pow(2).sum() for p in params)
        return (0.5 * resid.pow(2).sum() / MAP_NOISE**2 + 0.5 * PRIOR_PRECISION * weight_norm) / x.shape[0]

    adam = torch.optim.Adam(params, lr=3e-3)
    for _ in range(adam_steps):
        adam.zero_grad()
        loss = objective()
        loss.backward()
        adam.step()
    history = [loss.item()]

    lbfgs = torch.optim.LBFGS(params, lr=1.0, max_iter=lbfgs_steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    lbfgs.step(closure)
    with torch.no_grad():
        history.append(objective().item())
    return history


def gaussian_nll(y: Tensor, mean: Tensor, var: Tensor) -> float:
    """Mean negative log density of ``y`` under independent ``N(mean, var)``."""
    return float(0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var).mean())


def rmse(y: Tensor, mean: Tensor) -> float:
    """Root mean squared error."""
    return float((y - mean).pow(2).mean().sqrt())


@torch.no_grad()
def gp_predict(
    model: ntkgp.LinearizedGP, likelihood: gpytorch.likelihoods.GaussianLikelihood, x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Latent mean, latent (epistemic) variance and total predictive variance at ``x``."""
    model.eval()
    likelihood.eval()
    f = model(x)
    y = likelihood(f)
    return f.mean, f.variance, y.variance


def fit_hyperparameters(
    model: ntkgp.LinearizedGP,
    likelihood: gpytorch.likelihoods.GaussianLikelihood,
    x: Tensor,
    y: Tensor,
    steps: int = 100,
    lr: float = 0.05,
) -> list[float]:
    """Maximize the exact marginal likelihood over δ and σ² with Adam; returns the log evidence
    (summed over the N training points) at each step."""
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    likelihood.train()
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        opt.step()
        curve.append(-loss.item() * x.shape[0])
    model.eval()
    likelihood.eval()
    return curve


def plot(
    path: str,
    y_test: Tensor,
    mean: Tensor,
    latent_var: Tensor,
    total_var: Tensor,
    curve: list[float],
) -> None:
    """Two panels: test predictive bands sorted by predicted mean, and the marglik curve."""
    order = torch.argsort(mean)
    m, y = mean[order].numpy(), y_test[order].numpy()
    sd_f, sd_y = latent_var[order].sqrt().numpy(), total_var[order].sqrt().numpy()
    idx = np.arange(len(m))

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    ax0.fill_between(idx, m - 2 * sd_y, m + 2 * sd_y, color="C0", alpha=0.18, label="±2 sd predictive (incl. noise)")
    ax0.fill_between(idx, m - 2 * sd_f, m + 2 * sd_f, color="C0", alpha=0.45, label="±2 sd epistemic (latent)")
    ax0.plot(idx, m, color="C0", lw=1.5, label="predictive mean")
    ax0.scatter(idx, y, s=10, color="k", zorder=3, label="true target")
    ax0.set_xlabel("test point (sorted by predicted mean)")
    ax0.set_ylabel("standardized disease progression")
    ax0.set_title("LinearizedGP on diabetes (after marglik fit)")
    ax0.legend(loc="upper left", fontsize=8)

    ax1.plot(np.arange(1, len(curve) + 1), curve, color="C1")
    ax1.set_xlabel("Adam step")
    ax1.set_ylabel("log evidence  log p(y | δ, σ)")
    ax1.set_title("marginal-likelihood training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Train, linearize, fit hyperparameters, print the comparison table and write the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="quickstart.png", help="path of the figure (default: quickstart.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the network init (default: 0)")
    parser.add_argument("--steps", type=int, default=400, help="Adam steps on the marginal likelihood (default: 400)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate for δ and σ² (default: 0.1)")
    parser.add_argument("--n-train", type=int, default=None, help="use only this many training points (default: all)")
    parser.add_argument("--width", type=int, default=50, help="hidden units per layer (default: 50)")
    parser.add_argument("--map-adam-steps", type=int, default=1000, help="Adam steps of the MAP fit (default: 1000)")
    parser.add_argument(
        "--map-lbfgs-steps", type=int, default=50, help="L-BFGS iterations of the MAP fit (default: 50)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; the problem is tiny, and more threads only add overhead)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE) for a seconds-long test run")
    args = parser.parse_args(argv)
    if args.smoke:  # the SMOKE values replace the defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    data = load_data(args.seed, n_train=args.n_train)
    n_train, n_features = data.x_train.shape

    # --- (1) MAP fit --------------------------------------------------------------------
    net = make_net(n_features, args.width)
    train_map(net, data.x_train, data.y_train, adam_steps=args.map_adam_steps, lbfgs_steps=args.map_lbfgs_steps)
    net.eval()
    with torch.no_grad():
        map_train = net(data.x_train).squeeze(-1)
        map_test = net(data.x_test).squeeze(-1)
    train_mse = float((data.y_train - map_train).pow(2).mean())
    num_params = sum(p.numel() for p in net.parameters())
    t_map = time.perf_counter() - start

    # --- (2) the network as a GP ----------------------------------------------------------
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = train_mse
    model = ntkgp.LinearizedGP(net, likelihood, data.x_train, data.y_train, prior_precision=PRIOR_PRECISION)
    with torch.no_grad():
        evidence_before = float(model.log_evidence())
        before = gp_predict(model, likelihood, data.x_test)

    # --- (3) hyperparameters by marginal likelihood -------------------------------------
    curve = fit_hyperparameters(model, likelihood, data.x_train, data.y_train, steps=args.steps, lr=args.lr)
    with torch.no_grad():
        evidence_after = float(model.log_evidence())
        after = gp_predict(model, likelihood, data.x_test)
    delta = model.prior_precision.detach()
    sigma = float(likelihood.noise.detach().sqrt())

    # --- (4) report -----------------------------------------------------------------------
    y = data.y_test
    rows = [
        ("(a) MAP plug-in, sigma = train RMSE", map_test, torch.full_like(map_test, train_mse)),
        ("(b) LinearizedGP, before fit", before[0], before[2]),
        ("(c) LinearizedGP, after fit", after[0], after[2]),
    ]
    print(
        f"diabetes: {n_train} train / {len(y)} test points, {n_features} features; "
        f"MLP {n_features}-{args.width}-{args.width}-1 tanh, P = {num_params} parameters; solver: {model.solver.name}"
    )
    print(f"MAP fit: train RMSE {math.sqrt(train_mse):.4f}, test RMSE {rmse(y, map_test):.4f} ({t_map:.1f} s)\n")
    print(f"| {'method':<36} | {'test NLL':>8} | {'test RMSE':>9} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 11}|")
    for name, mean, var in rows:
        print(f"| {name:<36} | {gaussian_nll(y, mean, var):>8.4f} | {rmse(y, mean):>9.4f} |")
    delta_str = ", ".join(f"{d:.4g}" for d in delta.tolist())
    print(f"\nprior precision delta: {PRIOR_PRECISION:.4g} -> {delta_str}")
    print(f"noise sigma:           {math.sqrt(train_mse):.4f} -> {sigma:.4f}")
    print(f"log evidence:          {evidence_before:.2f} -> {evidence_after:.2f}")

    plot(args.out, y, after[0], after[1], after[2], curve)
    print(f"\nwrote {args.out}  (total {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
