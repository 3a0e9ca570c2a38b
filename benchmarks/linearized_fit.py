r"""Benchmark: fitting the prior precision at the linearized model's mode (small, CPU, seconds per row).

Networks not at any MAP (Adam on the likelihood alone, no weight decay, stopped early), on the first
``N`` scikit-learn digits (pixels / 16):

* ``cnn``: Conv(1→4)-BN-ReLU-MaxPool, Conv(4→8)-BN-ReLU-MaxPool, Linear(32→10) (P = 690), 150 full-batch
  steps in train mode, then the BatchNorm statistics of the full batch and eval mode (the ``cnn_bn`` task
  of ``calibration_tasks.py``, narrower);
* ``mlp``: 64-16-10 tanh, softmax (P = 1,210), 100 steps;
* ``bernoulli``: 64-16-1 tanh, label = digit >= 5 (P = 1,057), 100 steps.

Per network, dtype and solver space (``mode="linearized"``):

* ``--check gradient``: the gradient of the evidence in :math:`\log\delta` at the first prior precision
  against central differences (step ``--step``) of cold-started evaluations, and against the same
  weights cast to float64; value and gradient after warm starts from other :math:`\delta`;
* ``--check fit`` (default): ``fit_hyperparameters(model)``: evaluations, iterations, final gradient
  norm, converged, wall time.

Usage::

    PYTHONPATH=. python benchmarks/linearized_fit.py --kinds cnn mlp bernoulli --dtypes float32 float64
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

import ntkgp
from ntkgp.likelihoods import BernoulliLikelihood, SoftmaxLikelihood
from ntkgp.marglik import fit_hyperparameters
from ntkgp.solvers.mode import LinearizedMode


def _cnn(dtype: torch.dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).to(dtype)


def make(kind: str, dtype: torch.dtype, n: int) -> tuple[nn.Module, object, Tensor, Tensor]:
    """The network (eval mode), its likelihood, inputs and targets."""
    torch.manual_seed(0)
    pixels, digits = load_digits(return_X_y=True)
    x = torch.as_tensor(pixels[:n] / 16.0, dtype=dtype)
    y = torch.as_tensor(digits[:n])
    if kind == "cnn":
        x, net, steps = x.reshape(-1, 1, 8, 8), _cnn(dtype), 150
    else:
        width = 1 if kind == "bernoulli" else 10
        net, steps = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, width)).to(dtype), 100
    if kind == "bernoulli":
        y = (y >= 5).to(dtype)
        lik: object = BernoulliLikelihood()
    else:
        lik = SoftmaxLikelihood(num_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        (-lik.log_likelihood(net(x), y)).backward()  # type: ignore[attr-defined]
        opt.step()
    if kind == "cnn":
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            net(x)
    return net.eval(), lik, x, y


def _value_gradient(finder: LinearizedMode, log_delta: Tensor) -> tuple[float, Tensor]:
    s = log_delta.clone().requires_grad_(True)
    evidence = finder.log_evidence(s.exp())
    (g,) = torch.autograd.grad(evidence, s)
    return float(evidence.detach()), g.to(torch.float64)


def check_gradient(kind: str, dtype: torch.dtype, space: str, n: int, prior: str, step: float) -> None:
    net, lik, x, y = make(kind, dtype, n)
    start: float | str = 1.0 if prior == "scalar" else prior
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=start, solver=space, mode="linearized")
    finder = model.mode_finder
    assert finder is not None
    s0 = model.prior_precision.detach().to(torch.float64).log()
    finder.forget_modes()
    v0, g0 = _value_gradient(finder, s0)
    fd = torch.zeros_like(s0)
    for i in range(s0.numel()):
        e = torch.zeros_like(s0)
        e[i] = step
        finder.forget_modes()
        plus = _value_gradient(finder, s0 + e)[0]
        finder.forget_modes()
        fd[i] = (plus - _value_gradient(finder, s0 - e)[0]) / (2 * step)
    line = f"{kind} {str(dtype)[6:]} {space} G={s0.numel()}: |g - fd| = {float((g0 - fd).abs().max()):.1e}"
    if dtype != torch.float64:
        y64 = y.double() if y.is_floating_point() else y
        twin = ntkgp.LinearizedGP(
            copy.deepcopy(net).double(), lik, x.double(), y64, prior_precision=start, solver=space, mode="linearized"
        )
        assert twin.mode_finder is not None
        line += f", |g - g(float64 copy)| = {float((g0 - _value_gradient(twin.mode_finder, s0)[1]).abs().max()):.1e}"
    warm = []
    for offset in (0.5, -0.5, 0.05, 1e-3):
        finder.forget_modes()
        _value_gradient(finder, s0 + offset)
        finder.forget_modes(keep_warm_start=True)
        v, g = _value_gradient(finder, s0)
        warm.append((abs(v - v0), float((g - g0).abs().max())))
    line += f"; warm starts: |dL| <= {max(w[0] for w in warm):.1e}, |dg| <= {max(w[1] for w in warm):.1e}"
    print(line, flush=True)


def check_fit(kind: str, dtype: torch.dtype, space: str, n: int, prior: str) -> None:
    net, lik, x, y = make(kind, dtype, n)
    start: float | str = 1.0 if prior == "scalar" else prior
    model = ntkgp.LinearizedGP(net, lik, x, y, prior_precision=start, solver=space, mode="linearized")
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_hyperparameters(model)
    print(
        f"| {kind} | {str(dtype)[6:]} | {space} | {model.layout.num_groups} | {fit.evaluations} | {fit.iterations} "
        f"| {fit.gradient_norm:.1e} | {fit.converged} | {time.perf_counter() - started:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["cnn", "mlp", "bernoulli"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--spaces", nargs="+", default=["weight", "kernel"])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--prior", default="scalar", help="'scalar' (from 1.0) or a structure such as 'module'")
    parser.add_argument("--check", choices=["fit", "gradient"], default="fit")
    parser.add_argument("--step", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.check == "fit":
        print("| net | dtype | space | G | evaluations | iterations | final \\|g\\| | converged | s |")
        print("|---|---|---|---:|---:|---:|---:|---|---:|")
    for kind in args.kinds:
        for name in args.dtypes:
            for space in args.spaces:
                dtype = getattr(torch, name)
                if args.check == "fit":
                    check_fit(kind, dtype, space, args.n, args.prior)
                else:
                    check_gradient(kind, dtype, space, args.n, args.prior, args.step)


if __name__ == "__main__":
    main()
