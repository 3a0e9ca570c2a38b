r"""The tasks of the calibration benchmark: data (scikit-learn's bundled sets), networks, and their training.

Each task is a trained float32 network in eval mode with its training set, in-distribution test
set and a shifted (OOD) set, built reproducibly from ``seed``:

* ``cnn_bn``: digits (1,257 train / 540 test, pixels / 16), Conv(1→16)-BN-ReLU-MaxPool,
  Conv(16→32)-BN-ReLU-MaxPool, Linear(128→10) (P = 6,186), full batch in train mode on
  sum-CE + ½·1·‖θ‖² (Adam, 2000 steps, cosine learning rate from 1e-2), then the BatchNorm
  statistics recomputed on the full training batch and eval mode;
* ``mlp_digits``: the same split, 64-32-32-10 tanh MLP (P = 3,466), to the MAP of sum-CE + ½‖θ‖²
  (Adam 2000 steps, then L-BFGS);
* ``breast_cancer``: 398 / 171 (stratified), standardized features, 30-16-16-1 tanh MLP (P = 785),
  Bernoulli, to the MAP of sum-BCE + ½‖θ‖²;
* ``diabetes``: 309 / 133, standardized features and targets, 10-32-1 tanh MLP (P = 385), to
  the MAP of ‖y − f‖²/(2·0.5) + ½·10·‖θ‖² (δ = 1 overfits: test RMSE 1.07 against 0.71);
* ``cnn_early_stop``: digits, the CNN without BatchNorm (P = 6,090), Adam (lr 1e-3, batch 64) on
  mean CE with no weight decay, on 1,000 of the 1,257 training images, stopped at the best
  validation NLL on the other 257 (patience 10 epochs): not at any MAP;
* ``transformer``: generated token sentences (length 16 over a vocabulary of 120 ids: ids 1-10
  "positive", 11-20 "negative", 21-99 neutral, 100-119 never used in training), label = whether
  positive ids outnumber negative ones (ties redrawn), 1,000 train / 500 test; ``nn.Embedding(120, 32)``
  + 2 ``nn.TransformerEncoderLayer`` (4 heads, feed-forward 64, dropout 0.1) + mean pool +
  Linear(32→2) (P = 20,994), full batch in train mode (dropout on) on sum-CE + ½·1·‖θ‖² (Adam,
  2000 steps, cosine learning rate from 1e-2), then eval mode: a MAP of the dropout objective, not of
  the eval-mode network.

OOD sets (fixed before any result was seen): digits: the test images with Gaussian pixel noise of
standard deviation 0.5, clipped to [0, 1]; tabular: the standardized test inputs plus Gaussian
noise of standard deviation 2; tokens: sentences of the same length drawn from the 20 ids never seen
in training (unknown words).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn import functional as F

TASKS = ("cnn_bn", "mlp_digits", "breast_cancer", "diabetes", "cnn_early_stop", "transformer")


@dataclass
class Task:
    """A trained network and its data. ``kind`` is ``"softmax"``, ``"bernoulli"`` or ``"gaussian"``."""

    name: str
    kind: str
    net: nn.Module
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    x_ood: Tensor
    prior_precision: float  # the weight decay the network was trained with (the stated prior)
    noise: float | None = None  # Gaussian: the MAP's noise variance (training MSE)
    train_seconds: float = 0.0
    num_classes: int = 10  # softmax tasks


def _digits(seed: int) -> tuple[Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, train_size=1257, random_state=seed, stratify=y)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8)  # noqa: E731
    g = torch.Generator().manual_seed(seed + 1)
    x_te = t(x_te)
    ood = (x_te + 0.5 * torch.randn(x_te.shape, generator=g)).clamp(0, 1)
    return t(x_tr), torch.as_tensor(y_tr), x_te, torch.as_tensor(y_te), ood


def _tabular(loader, seed: int, regression: bool) -> tuple[Tensor, ...]:
    x, y = loader(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, train_size=0.7, random_state=seed, stratify=None if regression else y
    )
    mean, sd = x_tr.mean(0), x_tr.std(0) + 1e-12
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    x_tr, x_te = f32((x_tr - mean) / sd), f32((x_te - mean) / sd)
    if regression:
        ym, ys = y_tr.mean(), y_tr.std()
        y_tr, y_te = f32((y_tr - ym) / ys), f32((y_te - ym) / ys)
    else:
        y_tr, y_te = torch.as_tensor(y_tr), torch.as_tensor(y_te)
    g = torch.Generator().manual_seed(seed + 1)
    return x_tr, y_tr, x_te, y_te, x_te + 2.0 * torch.randn(x_te.shape, generator=g)


#: the token task: vocabulary, sentence length, positive / negative / neutral / unseen id ranges
_VOCAB, _LENGTH = 120, 16
_POSITIVE, _NEGATIVE, _NEUTRAL, _UNSEEN = (1, 11), (11, 21), (21, 100), (100, 120)


def _sentences(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sentences ``(n, 16)`` of ids and their labels: positive ids outnumber negative ones (no ties)."""
    ids, labels = [], []
    while sum(len(i) for i in ids) < n:
        kind = torch.rand(2 * n, _LENGTH, generator=g)
        pos = torch.randint(*_POSITIVE, (2 * n, _LENGTH), generator=g)
        neg = torch.randint(*_NEGATIVE, (2 * n, _LENGTH), generator=g)
        neutral = torch.randint(*_NEUTRAL, (2 * n, _LENGTH), generator=g)
        batch = torch.where(kind < 0.125, pos, torch.where(kind < 0.25, neg, neutral))
        score = (kind < 0.125).sum(1) - ((kind >= 0.125) & (kind < 0.25)).sum(1)
        keep = score != 0
        ids.append(batch[keep])
        labels.append((score[keep] > 0).long())
    return torch.cat(ids)[:n], torch.cat(labels)[:n]


def _tokens(seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed + 1)
    x, y = _sentences(1000, g)
    xt, yt = _sentences(500, g)
    ood = torch.randint(*_UNSEEN, (500, _LENGTH), generator=g)
    return x, y, xt, yt, ood


def _token_classifier() -> nn.Module:
    """The architectures benchmark's transformer (Embedding, 2 encoder layers, mean pool, Linear), this vocabulary."""
    from benchmarks.architectures import TokenTransformer

    return TokenTransformer(vocab=_VOCAB)


def _cnn(bn: bool) -> nn.Sequential:
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        norm(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        norm(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _loss(kind: str, out: Tensor, y: Tensor, noise: float) -> Tensor:
    if kind == "softmax":
        return F.cross_entropy(out, y, reduction="sum")
    if kind == "bernoulli":
        return F.binary_cross_entropy_with_logits(out[:, 0], y.float(), reduction="sum")
    return (out[:, 0] - y).square().sum() / (2 * noise)


def train_map(
    net: nn.Module, kind: str, x: Tensor, y: Tensor, delta: float, *, lbfgs: bool, noise: float = 0.5
) -> None:
    """Full batch: Adam (2000 steps, cosine lr from 1e-2) then, with ``lbfgs``, L-BFGS on loss + ½δ‖θ‖²."""
    params = list(net.parameters())
    n = x.shape[0]

    def objective() -> Tensor:  # divided by N: the same minimizer, better scaled for Adam
        return (_loss(kind, net(x), y, noise) + 0.5 * delta * sum(p.square().sum() for p in params)) / n

    net.train()
    opt = torch.optim.Adam(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2000)
    for _ in range(2000):
        opt.zero_grad()
        objective().backward()
        opt.step()
        sched.step()
    if lbfgs:
        lb = torch.optim.LBFGS(
            params, max_iter=500, tolerance_grad=1e-9, history_size=50, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            lb.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        lb.step(closure)
    net.eval()


def recompute_batchnorm(net: nn.Module, x: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of the full batch ``x`` (train mode), then eval mode."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()


def train_early_stopped(net: nn.Module, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor, seed: int) -> int:
    """Adam (lr 1e-3, batch 64), mean CE, no weight decay; keeps the epoch of best validation NLL (patience 10)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    best, best_state, best_epoch, since = math.inf, None, 0, 0
    for epoch in range(200):
        net.train()
        for idx in torch.randperm(x.shape[0], generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = float(F.cross_entropy(net(xv), yv))
        if val < best:
            best, best_epoch, since = val, epoch, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            since += 1
            if since >= 10:
                break
    net.load_state_dict(best_state)
    net.eval()
    return best_epoch


def make_task(name: str, seed: int = 0, cache: Path | None = None) -> Task:
    """Train the network of task ``name`` (see the module docstring) with ``torch.manual_seed(seed)``.

    With ``cache`` (a folder), the trained network's ``state_dict`` is loaded from ``<name>-<seed>.pt``
    there when it exists (the data are rebuilt, the training skipped), else saved there after training."""
    import time

    started = time.perf_counter()
    torch.manual_seed(seed)
    stored = None if cache is None else cache / f"{name}-{seed}.pt"
    if stored is not None and stored.exists():
        task = _untrained(name, seed)
        task.net.load_state_dict(torch.load(stored))
        task.net.eval()
        if name == "diabetes":
            with torch.no_grad():
                task.noise = float((task.net(task.x)[:, 0] - task.y).square().mean())
        for p in task.net.parameters():
            p.requires_grad_(True)
        return task
    if name in ("cnn_bn", "mlp_digits", "cnn_early_stop"):
        x, y, xt, yt, ood = _digits(seed)
        if name == "cnn_bn":
            net = _cnn(bn=True)
            train_map(net, "softmax", x, y, 1.0, lbfgs=False)
            recompute_batchnorm(net, x)
            task = Task(name, "softmax", net, x, y, xt, yt, ood, 1.0)
        elif name == "mlp_digits":
            net = nn.Sequential(nn.Flatten(), _mlp([64, 32, 32, 10]))
            train_map(net, "softmax", x, y, 1.0, lbfgs=True)
            task = Task(name, "softmax", net, x, y, xt, yt, ood, 1.0)
        else:
            net = _cnn(bn=False)
            train_early_stopped(net, x[:1000], y[:1000], x[1000:], y[1000:], seed)
            task = Task(name, "softmax", net, x[:1000], y[:1000], xt, yt, ood, 1.0)
    elif name == "transformer":
        x, y, xt, yt, ood = _tokens(seed)
        net = _token_classifier()
        train_map(net, "softmax", x, y, 1.0, lbfgs=False)
        task = Task(name, "softmax", net, x, y, xt, yt, ood, 1.0, num_classes=2)
    elif name == "breast_cancer":
        x, y, xt, yt, ood = _tabular(load_breast_cancer, seed, regression=False)
        net = _mlp([30, 16, 16, 1])
        train_map(net, "bernoulli", x, y, 1.0, lbfgs=True)
        task = Task(name, "bernoulli", net, x, y, xt, yt, ood, 1.0)
    elif name == "diabetes":
        x, y, xt, yt, ood = _tabular(load_diabetes, seed, regression=True)
        net = _mlp([10, 32, 1])
        train_map(net, "gaussian", x, y, 10.0, lbfgs=True, noise=0.5)
        with torch.no_grad():
            mse = float((net(x)[:, 0] - y).square().mean())
        task = Task(name, "gaussian", net, x, y, xt, yt, ood, 10.0, noise=mse)
    else:
        raise ValueError(f"unknown task {name!r}; tasks are {TASKS}")
    for p in task.net.parameters():
        p.requires_grad_(True)
    task.train_seconds = time.perf_counter() - started
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        torch.save(task.net.state_dict(), stored)
    return task


def _untrained(name: str, seed: int) -> Task:
    """Task ``name``'s data and its network, untrained (for loading stored weights)."""
    if name in ("cnn_bn", "mlp_digits", "cnn_early_stop"):
        x, y, xt, yt, ood = _digits(seed)
        if name == "cnn_early_stop":
            return Task(name, "softmax", _cnn(bn=False), x[:1000], y[:1000], xt, yt, ood, 1.0)
        net = _cnn(bn=True) if name == "cnn_bn" else nn.Sequential(nn.Flatten(), _mlp([64, 32, 32, 10]))
        return Task(name, "softmax", net, x, y, xt, yt, ood, 1.0)
    if name == "transformer":
        x, y, xt, yt, ood = _tokens(seed)
        return Task(name, "softmax", _token_classifier(), x, y, xt, yt, ood, 1.0, num_classes=2)
    if name == "breast_cancer":
        x, y, xt, yt, ood = _tabular(load_breast_cancer, seed, regression=False)
        return Task(name, "bernoulli", _mlp([30, 16, 16, 1]), x, y, xt, yt, ood, 1.0)
    if name == "diabetes":
        x, y, xt, yt, ood = _tabular(load_diabetes, seed, regression=True)
        return Task(name, "gaussian", _mlp([10, 32, 1]), x, y, xt, yt, ood, 10.0)
    raise ValueError(f"unknown task {name!r}; tasks are {TASKS}")


def map_gradient_norm(task: Task) -> float:
    """Norm of the eval-mode gradient of the stated MAP objective (loss + ½δ‖θ‖²) at the trained weights."""
    net = task.net
    params = list(net.parameters())
    loss = _loss(task.kind, net(task.x), task.y, 0.5 if task.noise is None else 0.5)
    loss = loss + 0.5 * task.prior_precision * sum(p.square().sum() for p in params)
    grads = torch.autograd.grad(loss, params)
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
