r"""Digits: discrete model comparison by the Laplace log evidence, next to test NLL and accuracy.

What it does
------------
scikit-learn's ``load_digits`` (8x8 images, 10 classes) is split 70/30 (stratified, ``--seed``)
and standardized on the training pixels (sd floored at 1 pixel unit). Several architectures are
trained, each to a MAP of
:math:`-\sum_n \log\mathrm{softmax}(f(x_n))_{y_n} + \tfrac{\delta}{2}\lVert\theta\rVert^2` with
the same weight decay :math:`\delta` (``--delta``, default 1) and the same recipe (full-batch
Adam, then L-BFGS, float64):

* MLPs ``64-10`` (softmax regression), ``64-16-10``, ``64-32-10``, ``64-32-32-10`` (tanh),
  ``64-32-10`` (ReLU) and a wide ``64-128-10`` (tanh, P = 9,610);
* a small CNN on ``1x8x8`` inputs: ``Conv2d(1,8,3)-ReLU-Conv2d(8,16,3)-ReLU-Flatten-Linear(256,10)``.

Each trained network, unchanged, becomes ``ntkgp.LinearizedGP(net, SoftmaxLikelihood(10), X, y,
prior_precision=delta)`` and is scored by its Laplace log evidence:

* **exact** ``model.log_evidence()`` where P is at most ``--exact-max-params`` (5000): these
  networks have P < N C = 12,570, so the weight-space solver is used (Cholesky of the
  ``P x P`` GGN posterior precision; building it costs about N C P^2 flops, the bulk of the
  run time);
* the **subset-NTK lower bound** (:class:`ntkgp.marglik.SubsetEvidenceBound`, Fischer's
  inequality) with class-grouped partitions of ``--subset-size`` (100) points, for every network;
  it is the only score of the networks with more parameters (here the wide MLP), and its cost is
  linear in N. ``LinearizedGP`` builds its exact solver eagerly even when only the bound is wanted,
  so for the bound the solver is patched out (:func:`bound_only_models`).

The models are ranked by their exact evidence, or, marked ``>=``, by the bound where the exact
evidence was not computed: a lower bound, so such a network is *at least* that good. The bound's
own ranking of all networks is given next to it, as are the test NLL and accuracy of the MAP
network (plug-in softmax) and, where the exact model was built, of the GP's probit predictive.
The figure (``--out``, PNG) has two panels: each network's log evidence per training point
(bars: the ranking score; dots: the bound), and that score against the MAP test NLL.

Reading it: the evidence trades data fit against the Occam factor
:math:`-\tfrac12\log|I + B^\top K B|` and needs no validation split; at one fixed
:math:`\delta` for all networks it also judges how well that prior suits each architecture.
Whether its ranking follows the test NLL is what the table shows, not something guaranteed.
The bound's gap to the exact evidence (here 0.1-0.2 nats per point) differs between
architectures, so the bound can order networks differently from the exact evidence: compare its
two rank columns before trusting a bound-only comparison, or use larger subsets. At this weak
prior the GP's predictive is much less confident than the MAP network (higher test NLL, as in
``digits_classification.py``).

Run: ``.venv/bin/python examples/model_comparison_digits.py --out model_comparison.png`` (about
1-2 minutes on one CPU core; ``--quick`` trains less and skips the wide MLP).
``--smoke`` shrinks data, training and subsets (:data:`SMOKE`) for a seconds-long test run through the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import ntkgp
import ntkgp.models.linearized_gp as linearized_gp_module
from ntkgp.likelihoods import SoftmaxLikelihood
from ntkgp.marglik import SubsetEvidenceBound, class_partition

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

NUM_CLASSES = 10
SD_FLOOR = 1.0
#: ``--smoke``: option values of a seconds-long run through the same code (the test suite runs it). Every
#: architecture is still trained; only the smallest gets the exact evidence (with N C = 1000 > P = 650 it uses the
#: weight-space solver, as the exact ones do at full size), the others only the bound, as the wide MLP does.
SMOKE = {
    "n_train": 100,
    "n_test": 50,
    "adam_steps": 5,
    "lbfgs_iters": 3,
    "subset_size": 20,
    "exact_max_params": 1000,
}


def load_data(
    seed: int, n_train: int | None = None, n_test: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits split 70/30 (stratified), standardized on the training pixels, float64, shape (n, 1, 8, 8);
    ``n_train`` / ``n_test`` keep only the first so many images of each split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    x_tr, y_tr, x_te, y_te = x_tr[:n_train], y_tr[:n_train], x_te[:n_test], y_te[:n_test]
    mean, sd = x_tr.mean(0), np.maximum(x_tr.std(0), SD_FLOOR)

    def fx(a: np.ndarray) -> Tensor:
        return torch.as_tensor((a - mean) / sd, dtype=torch.float64).reshape(-1, 1, 8, 8)

    return fx(x_tr), torch.as_tensor(y_tr), fx(x_te), torch.as_tensor(y_te)


def mlp(*widths: int, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """An MLP on flattened 8x8 images: ``64-widths...-10``."""
    layers: list[nn.Module] = [nn.Flatten()]
    d_in = 64
    for w in widths:
        layers += [nn.Linear(d_in, w), activation()]
        d_in = w
    layers.append(nn.Linear(d_in, NUM_CLASSES))
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    """``Conv2d(1,8,3)-ReLU-Conv2d(8,16,3)-ReLU-Flatten-Linear(256,10)`` on 1x8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, NUM_CLASSES)
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "MLP 64-10": lambda: mlp(),
    "MLP 64-16-10": lambda: mlp(16),
    "MLP 64-32-10": lambda: mlp(32),
    "MLP 64-32-10 relu": lambda: mlp(32, activation=nn.ReLU),
    "MLP 64-32-32-10": lambda: mlp(32, 32),
    "MLP 64-128-10": lambda: mlp(128),
    "CNN 8-16": cnn,
}


@dataclass
class Result:
    """One architecture's scores."""

    name: str
    num_params: int
    train_seconds: float
    map_acc: float
    map_nll: float
    bound: float
    bound_seconds: float
    exact: float | None = None
    exact_seconds: float | None = None
    gp_acc: float | None = None
    gp_nll: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The exact log evidence if computed, else the lower bound."""
        return self.bound if self.exact is None else self.exact


def train_map(net: nn.Module, x: Tensor, y: Tensor, delta: float, adam_steps: int, lbfgs_iters: int) -> None:
    """Full-batch Adam then L-BFGS on the summed cross-entropy plus ``delta / 2 * |theta|^2``."""
    params = list(net.parameters())

    def loss_fn() -> Tensor:
        return F.cross_entropy(net(x), y, reduction="sum") + 0.5 * delta * sum(p.square().sum() for p in params)

    adam = torch.optim.Adam(params, lr=1e-2)
    for _ in range(adam_steps):
        adam.zero_grad()
        loss_fn().backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(
        params, max_iter=lbfgs_iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12
    )

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    lbfgs.step(closure)
    net.eval()


class _NoExactSolver:
    """Stands in for LinearizedGP's exact solver where only the subset bound is evaluated."""

    name = "none (subset bound only)"

    def __getattr__(self, item: str) -> Any:
        raise RuntimeError(f"the exact solver was not built (asked for {item!r})")


@contextlib.contextmanager
def bound_only_models() -> Iterator[None]:
    """Build ``LinearizedGP`` without its exact solver, which ``SubsetEvidenceBound`` never uses.

    ``LinearizedGP`` builds its exact solver eagerly (here ``P x P`` or ``NC x NC`` matrices);
    ntkgp has no option to skip it, so while a bound-only model is built the solver factory is
    swapped for a stub.
    """
    saved = linearized_gp_module.make_laplace_solver
    linearized_gp_module.make_laplace_solver = lambda *args, **kwargs: _NoExactSolver()
    try:
        yield
    finally:
        linearized_gp_module.make_laplace_solver = saved


def score(name: str, args: argparse.Namespace, data: tuple[Tensor, Tensor, Tensor, Tensor]) -> Result:
    """Train one architecture and compute its evidence (bound, and exact if small) and test metrics."""
    x, y, x_test, y_test = data
    torch.manual_seed(args.seed)
    net = ARCHITECTURES[name]().double()
    num_params = sum(p.numel() for p in net.parameters())
    start = time.perf_counter()
    train_map(net, x, y, args.delta, args.adam_steps, args.lbfgs_iters)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = net(x_test)
    map_acc = float((logits.argmax(-1) == y_test).double().mean())
    map_nll = float(F.cross_entropy(logits, y_test))

    likelihood = SoftmaxLikelihood(num_classes=NUM_CLASSES)
    start = time.perf_counter()
    with bound_only_models():
        light = ntkgp.LinearizedGP(net, likelihood, x, y, prior_precision=args.delta)
    parts = class_partition(y, args.subset_size, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        bound = float(SubsetEvidenceBound(light, parts)())
    result = Result(name, num_params, train_seconds, map_acc, map_nll, bound, time.perf_counter() - start)

    if num_params <= args.exact_max_params:
        start = time.perf_counter()
        model = ntkgp.LinearizedGP(net, likelihood, x, y, prior_precision=args.delta)
        with torch.no_grad():
            result.exact = float(model.log_evidence())
            result.exact_seconds = time.perf_counter() - start
            model.eval()
            probs = likelihood(model(x_test)).probs
        result.gp_acc = float((probs.argmax(-1) == y_test).double().mean())
        result.gp_nll = float(-probs.gather(-1, y_test.unsqueeze(-1)).clamp_min(1e-300).log().mean())
        result.extra["solver"] = model.solver.name
    return result


def plot(results: list[Result], n: int, path: str, subset_size: int) -> None:
    """Two panels: each network's evidence per point (bars: score; dots: bound); score vs MAP test NLL."""
    order = sorted(results, key=lambda r: r.score, reverse=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    pos = np.arange(len(order))
    exact = [r.exact is not None for r in order]
    ax1.barh(pos, [r.score / n for r in order], color=["tab:red" if e else "0.6" for e in exact], alpha=0.8)
    (dots,) = ax1.plot(
        [r.bound / n for r in order], pos, "o", color="tab:blue", label=f"subset bound (class-grouped, B={subset_size})"
    )
    handles = [
        Patch(color="tab:red", alpha=0.8, label="exact log evidence"),
        Patch(color="0.6", alpha=0.8, label="bound only (exact not computed)"),
        dots,
    ]
    ax1.set_yticks(pos, [f"{r.name} (P={r.num_params})" for r in order])
    ax1.invert_yaxis()
    ax1.set_xlabel("log evidence / N (nats per training point)")
    ax1.set_title("Laplace log evidence (higher is better)")
    ax1.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.4, -0.13), ncol=3, fontsize=8)
    for r in results:
        marker, color = ("o", "tab:red") if r.exact is not None else ("s", "0.4")
        ax2.scatter(r.score / n, r.map_nll, marker=marker, color=color)
        ax2.annotate(
            r.name.replace("MLP ", ""), (r.score / n, r.map_nll), fontsize=8, xytext=(4, 3), textcoords="offset points"
        )
    ax2.set_xlabel("log evidence / N (circles: exact; squares: lower bound)")
    ax2.set_ylabel("test NLL of the MAP network (lower is better)")
    ax2.set_title("Evidence vs held-out NLL")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="model_comparison_digits.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delta", type=float, default=1.0, help="weight decay (prior precision) of every network")
    parser.add_argument("--subset-size", type=int, default=100)
    parser.add_argument("--exact-max-params", type=int, default=5000)
    parser.add_argument("--adam-steps", type=int, default=300)
    parser.add_argument("--lbfgs-iters", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="less training; skip the wide MLP")
    parser.add_argument("--n-train", type=int, default=None, help="use only this many training images (default: all)")
    parser.add_argument("--n-test", type=int, default=None, help="use only this many test images (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE) for a seconds-long test run")
    args = parser.parse_args(argv)
    if args.smoke:  # the SMOKE values replace the defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.adam_steps, args.lbfgs_iters = 100, 30
    names = [k for k in ARCHITECTURES if not (args.quick and k == "MLP 64-128-10")]
    data = load_data(args.seed, args.n_train, args.n_test)
    n = data[0].shape[0]
    start = time.perf_counter()
    results = []
    for name in names:
        r = score(name, args, data)
        results.append(r)
        print(
            f"  {name:<20} P={r.num_params:5d}  bound {r.bound:9.1f}  exact "
            f"{'-' if r.exact is None else f'{r.exact:9.1f}'}  MAP test NLL {r.map_nll:.4f}  "
            f"({r.train_seconds:.1f} s train, {r.bound_seconds:.1f} s bound"
            f"{'' if r.exact_seconds is None else f', {r.exact_seconds:.1f} s exact'})",
            flush=True,
        )

    ranked = sorted(results, key=lambda r: r.score, reverse=True)
    print(
        f"\nDigits, N = {n} training points, every network at delta = {args.delta:g}. Ranked by the exact "
        f"Laplace log evidence (weight-space solver, P <= {args.exact_max_params}), or, marked >=, by the "
        f"subset-NTK lower bound (class-grouped subsets of {args.subset_size}) where the exact one was not "
        f"computed.\n"
    )
    print(
        "| rank | model | P | log evidence | exact | subset bound (rank) | MAP test NLL (rank) | MAP test acc | "
        "GP test NLL | GP test acc |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    bound_rank = {r.name: i + 1 for i, r in enumerate(sorted(results, key=lambda r: r.bound, reverse=True))}
    nll_rank = {r.name: i + 1 for i, r in enumerate(sorted(results, key=lambda r: r.map_nll))}

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for i, r in enumerate(ranked):
        print(
            f"| {i + 1} | {r.name} | {r.num_params} | {'' if r.exact is not None else '>= '}{r.score:.1f} | "
            f"{f(r.exact, '.1f')} | {r.bound:.1f} ({bound_rank[r.name]}) | {r.map_nll:.4f} ({nll_rank[r.name]}) | "
            f"{r.map_acc:.4f} | {f(r.gp_nll, '.4f')} | {f(r.gp_acc, '.4f')} |"
        )
    print("\n(Brackets: ranks among all models by the bound and by the MAP test NLL.)")
    for r in ranked:
        if r.exact is None:
            print(
                f"{r.name} has only the lower bound, so it is placed by a value its exact evidence exceeds; on the "
                f"bound's own scale it ranks {bound_rank[r.name]} of {len(results)}."
            )
    plot(results, n, args.out, args.subset_size)
    print(f"wrote {args.out}; total {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
