r"""Benchmark (issue 15): the architectures users bring, against laplace-torch in the same process.

Networks (generated inputs, random labels: this measures speed and coverage, not calibration):

* ``resnet20``: the CIFAR ResNet-20 (three stages of three basic blocks, widths 16/32/64, BatchNorm
  in eval mode with running statistics), 32x32x3 inputs, C = 10, P = 272,474;
* ``transformer``: ``nn.Embedding`` + 2 ``nn.TransformerEncoderLayer`` + mean pool + Linear on token
  ids (integer inputs, vocabulary 500, length 16), C = 2;
* ``lstm``: an ``nn.LSTM`` regressor (length 20, 4 features, hidden 32) with a linear head;
* ``tabular``: ``forward(x_num, x_cat)`` with 8 numeric columns and 3 embedded categorical ones;
* ``resnet18``: torchvision's ``resnet18(num_classes=10)`` rebuilt module for module (P = 11.2M) on
  32x32x3: the last-layer GP and ``subnetwork=["layer4", "fc"]`` with ``Inducing`` at
  ``--last-layer-n``, and the all-weights Gram of ``--gram-n`` points against the GEMM rate.

Rows, each timed as build + evidence + 500 test predictions, with the peak RSS added:

* ``ntkgp exact``: every weight, the default exact route (``solver="auto"``), at ``--exact-n``;
* ``ntkgp inducing``: every weight, ``Inducing(num_inducing=M)``, at each of ``--inducing-n``;
* ``ntkgp last layer``: ``subnetwork="last_layer"`` (the closed form: features times the head);
* ``lt ...``: laplace-torch's last-layer KFAC (its default), full-network KFAC, and
  ``FunctionalLaplace`` (its GP view, on ``n_subset`` points); a peer that does not run on the
  architecture is reported with its error.

The ``lastlayer`` task is the issue's target: 512 features, C = 10, N = 5,000, float64, against
``Laplace(net, "classification", subset_of_weights="last_layer", hessian_structure="full")``:
evidence, latent covariance and probit probabilities, and the time ratio.

``--check`` compares the all-weights evidence with a float64 brute force over the whole network
(``torch.func`` Jacobians) for the transformer (N = 1000, C = 2) and ResNet-20 (N = 200, C = 10), or at
``--check-n`` points (the brute force holds the float64 Jacobian: 4.4 GB for ResNet-20 at N = 200).

Every row records wall and CPU seconds (this process's CPU time: on a shared machine the wall time
also counts other jobs' share of the cores) and the load averages before and after it; ntkgp rows
also record ``build_evidence_seconds``, the part before the predictions.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/architectures.py --tasks lastlayer transformer --json /tmp/arch.json
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpytorch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a file (python benchmarks/<name>.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ntkgp  # noqa: E402
from benchmarks.harness import PeakRSS, finish_report, loadavg, start_report  # noqa: E402
from ntkgp.likelihoods import SoftmaxLikelihood  # noqa: E402

N_TEST = 500


# ----------------------------------------------------------------------------- networks
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet20(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(3):
                layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(F.relu(self.bn(self.stem(x)))).mean((2, 3)))


class _Block18(nn.Module):
    """torchvision's ResNet ``BasicBlock`` (same module names)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(skip + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet18(nn.Module):
    """torchvision's ``resnet18(num_classes=10)``, layer for layer and name for name (torchvision is
    not a dependency): 7x7 stem with stride 2, max pool, four stages of two blocks (64-512), fc."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(_Block18(cin, cout, stride), _Block18(cout, cout, 1)))
            cin = cout
        self.fc = nn.Linear(512, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class TokenTransformer(nn.Module):
    def __init__(self, vocab: int = 500, width: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


class LSTMRegressor(nn.Module):
    def __init__(self, features: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class TabularNet(nn.Module):
    def __init__(self, numeric: int = 8, levels: tuple[int, ...] = (12, 7, 30), width: int = 64) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(n, 4) for n in levels)
        self.body = nn.Sequential(
            nn.Linear(numeric + 4 * len(levels), width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x_num: Tensor, x_cat: Tensor) -> Tensor:
        parts = [x_num] + [e(x_cat[:, i]) for i, e in enumerate(self.embeds)]
        return self.head(self.body(torch.cat(parts, 1)))


class FeatureHead(nn.Module):
    """The last-layer target: a body to 512 features, then ``Linear(512, 10)``."""

    def __init__(self, d_in: int = 32, features: int = 512, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 256), nn.Tanh(), nn.Linear(256, features), nn.Tanh())
        self.head = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Task:
    """A network, an input generator and its likelihood."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.classes = {"resnet20": 10, "resnet18": 10, "transformer": 2, "lastlayer": 10}.get(name, 0)
        self.net: nn.Module = {
            "resnet20": ResNet20,
            "resnet18": ResNet18,
            "transformer": TokenTransformer,
            "lstm": LSTMRegressor,
            "tabular": TabularNet,
            "lastlayer": FeatureHead,
        }[name]().to(dtype)
        self.generator = g
        if name in ("resnet20", "resnet18"):  # running statistics from a batch, then eval mode
            self.net.train()
            with torch.no_grad():
                self.net(self.inputs(256))
        self.net.eval()

    def inputs(self, n: int) -> Any:
        g, dt = self.generator, self.dtype
        if self.name in ("resnet20", "resnet18"):
            return torch.randn(n, 3, 32, 32, generator=g, dtype=dt)
        if self.name == "transformer":
            return torch.randint(0, 500, (n, 16), generator=g)
        if self.name == "lstm":
            return torch.randn(n, 20, 4, generator=g, dtype=dt)
        if self.name == "tabular":
            levels = torch.tensor([12, 7, 30])
            return (torch.randn(n, 8, generator=g, dtype=dt), (torch.rand(n, 3, generator=g) * levels).long())
        return torch.randn(n, 32, generator=g, dtype=dt)

    def targets(self, x: Any) -> Tensor:
        with torch.no_grad():
            f = self.net(*x) if isinstance(x, tuple) else self.net(x)
        if self.classes:  # labels the network mostly agrees with
            return (f + 0.5 * torch.randn(f.shape, generator=self.generator, dtype=f.dtype)).argmax(-1)
        return (f[:, 0] + 0.1 * torch.randn(f.shape[0], generator=self.generator, dtype=f.dtype)).to(self.dtype)

    def likelihood(self) -> gpytorch.likelihoods.Likelihood:
        if self.classes:
            return SoftmaxLikelihood(self.classes)
        lik = gpytorch.likelihoods.GaussianLikelihood().to(self.dtype)
        lik.noise = 0.01
        return lik

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


# ------------------------------------------------------------------------------- ntkgp rows
def _predict(model: ntkgp.LinearizedGP, x_test: Any) -> Tensor:
    model.eval()
    with torch.no_grad():
        out = model.likelihood(model(x_test))
    return out.probs if hasattr(out, "probs") else out.variance


def _measured(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s row with its wall and CPU seconds (the CPU time of this process: on a shared machine
    the wall time also counts the other jobs' share of the cores), load averages and added peak RSS."""
    load_start = loadavg()
    with PeakRSS() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            row = fn()
        except Exception as error:  # a peer that does not run on the architecture: report why
            row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
            traceback.print_exc(limit=2)
        row["seconds"] = time.perf_counter() - start
        row["cpu_seconds"] = time.process_time() - cpu
    row["peak_mib"] = peak.peak_delta / 2**20
    row["load"] = [load_start, loadavg()]
    return row


def ntkgp_row(task: Task, n: int, **kwargs: Any) -> dict[str, Any]:
    x, x_test = task.inputs(n), task.inputs(N_TEST)
    y = task.targets(x)

    def run() -> dict[str, Any]:
        start = time.perf_counter()
        model = ntkgp.LinearizedGP(task.net, task.likelihood(), x, y, prior_precision=1.0, mode="map", **kwargs)
        evidence = float(model.log_evidence())
        build = time.perf_counter() - start
        plan, numels = model.ntk.plan(), model.network.numels
        structured = sum(numels[i] for i in plan.structured) / sum(numels)
        _predict(model, x_test)
        return {
            "evidence": evidence,
            "structured": structured,
            "P": sum(numels),
            "solver": model.solver.name,
            "build_evidence_seconds": build,
        }

    return {"n": n, **_measured(run)}


# -------------------------------------------------------------------------- laplace-torch
def _loader(x: Tensor, y: Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=100)


def _packed(x: Any) -> Tensor:
    """laplace-torch passes one tensor to the model: numeric and categorical columns packed as floats."""
    return torch.cat([x[0], x[1].to(x[0].dtype)], 1) if isinstance(x, tuple) else x


class _Splat(nn.Module):
    """The network behind one packed tensor (for peers that pass one object)."""

    def __init__(self, net: nn.Module, tabular: bool) -> None:
        super().__init__()
        self.net, self.tabular = net, tabular

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[:, :8], x[:, 8:].long()) if self.tabular else self.net(x)


def peer_row(task: Task, n: int, kind: str) -> dict[str, Any]:
    import laplace

    x, x_test = task.inputs(n), task.inputs(N_TEST)
    y = task.targets(x)
    lik = "classification" if task.classes else "regression"

    def run() -> dict[str, Any]:
        net = _Splat(task.net, task.name == "tabular")
        sigma = {} if task.classes else {"sigma_noise": 0.1}
        if kind == "lt last-layer kfac":
            peer = laplace.Laplace(net, lik, subset_of_weights="last_layer", hessian_structure="kron", **sigma)
        elif kind == "lt full kfac":
            peer = laplace.Laplace(net, lik, subset_of_weights="all", hessian_structure="kron", **sigma)
        else:
            peer = laplace.FunctionalLaplace(net, lik, n_subset=n, **sigma)
        peer.fit(_loader(_packed(x), y if task.classes else y.reshape(-1, 1)))
        evidence = float(peer.log_marginal_likelihood())
        test = x_test if not isinstance(x_test, tuple) else x_test
        with torch.no_grad():
            for start in range(0, N_TEST, 100):
                chunk = (
                    tuple(t[start : start + 100] for t in test)
                    if isinstance(test, tuple)
                    else test[start : start + 100]
                )
                pred_type = "gp" if kind == "lt functional" else "glm"  # its functional class predicts as a GP
                peer(chunk, pred_type=pred_type, link_approx="probit" if task.classes else "mc")
        return {"evidence": evidence}

    return {"n": n, **_measured(run)}


# ---------------------------------------------------------------------- the last-layer target
def last_layer_target(n: int) -> dict[str, Any]:
    import laplace

    task = Task("lastlayer", torch.float64)
    x, x_test = task.inputs(n), task.inputs(N_TEST)
    y = task.targets(x)
    out: dict[str, Any] = {"n": n}
    start = time.perf_counter()
    model = ntkgp.LinearizedGP(
        task.net, SoftmaxLikelihood(10), x, y, prior_precision=1.0, subnetwork="last_layer", mode="map"
    )
    evidence = float(model.log_evidence())
    model.eval()
    with torch.no_grad():
        latent = model(x_test)
        blocks = latent.lazy_covariance_matrix.point_blocks()
        probs = model.likelihood(latent).probs
    out["ntkgp_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    peer = laplace.Laplace(task.net, "classification", subset_of_weights="last_layer", hessian_structure="full")
    peer.fit(DataLoader(TensorDataset(x, y), batch_size=250))
    peer_evidence = float(peer.log_marginal_likelihood())
    with torch.no_grad():
        _, peer_cov = peer._glm_predictive_distribution(x_test)  # the latent covariance (no public accessor)
        peer_probs = peer(x_test, pred_type="glm", link_approx="probit")
    out["peer_seconds"] = time.perf_counter() - start
    out["ratio"] = out["ntkgp_seconds"] / out["peer_seconds"]
    out["evidence_rel"] = abs(evidence - peer_evidence) / abs(peer_evidence)
    out["covariance_rel"] = float((blocks - peer_cov).abs().max() / peer_cov.abs().max())
    out["probs_abs"] = float((probs - peer_probs).abs().max())
    return out


def gram_rate(task: Task, n: int) -> dict[str, Any]:
    """The all-weights Gram of ``n`` points: its useful rate, ``(N C)^2 P`` flops per second, against
    the machine's measured GEMM rate (a square matmul of 2048 in the network's dtype)."""
    x = task.inputs(n)
    model = ntkgp.LinearizedGP(task.net, task.likelihood(), x, task.targets(x), prior_precision=1.0, mode="map")
    ntk, xi = model.ntk, model.network.inputs(x)
    ntk.plan(xi)
    start = time.perf_counter()
    ntkgp.ntk.gram(ntk, xi, weights=torch.ones(ntk.layout.num_groups, dtype=torch.float64))
    seconds = time.perf_counter() - start
    a = torch.randn(2048, 2048, dtype=task.dtype)
    a @ a
    gemm_start = time.perf_counter()
    for _ in range(3):
        a @ a
    gemm = 3 * 2 * 2048**3 / (time.perf_counter() - gemm_start)
    useful = (n * task.classes) ** 2 * task.numel / seconds
    return {
        "n": n,
        "seconds": seconds,
        "useful_gflops": useful / 1e9,
        "gemm_gflops": gemm / 1e9,
        "fraction": useful / gemm,
    }


# ---------------------------------------------------------------------------- brute force
def brute_force_check(name: str, n: int) -> dict[str, Any]:
    """All-weights evidence against a float64 torch.func Jacobian of the whole network."""
    task = Task(name, torch.float64)
    x = task.inputs(n)
    y = task.targets(x)
    start, cpu = time.perf_counter(), time.process_time()
    model = ntkgp.LinearizedGP(task.net, task.likelihood(), x, y, prior_precision=1.0, mode="map")
    evidence = float(model.log_evidence())
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    del model  # its Gram and factors, before the brute force's Jacobian
    params = {k: v.detach() for k, v in task.net.named_parameters()}
    theta = torch.cat([v.reshape(-1) for v in params.values()])

    def f(flat: Tensor, xc: Tensor) -> Tensor:
        split, i = {}, 0
        for k, v in params.items():
            split[k] = flat[i : i + v.numel()].view_as(v)
            i += v.numel()
        return torch.func.functional_call(task.net, split, (xc,))

    print({"task": name, "n": n, "ntkgp_evidence": evidence, "ntkgp_seconds": seconds}, flush=True)
    step = 4 if name == "resnet20" else 50  # jacrev holds C * step copies of the activations
    j = torch.empty(n * task.classes, theta.numel(), dtype=theta.dtype)  # shape: (N*C, P), filled in place
    for start in range(0, n, step):
        stop = min(start + step, n)
        j[start * task.classes : stop * task.classes] = torch.func.jacrev(f)(theta, x[start:stop]).reshape(
            -1, theta.numel()
        )
    with torch.no_grad():
        logits = task.net(x)
    probs = logits.softmax(-1)
    hessian = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)  # shape: (N, C, C)
    # log|I_P + J^T H J| = log|I_NC + H J J^T| (Sylvester), so no P x P matrix is formed
    _, log_det = torch.linalg.slogdet(torch.eye(j.shape[0], dtype=j.dtype) + torch.block_diag(*hessian) @ (j @ j.T))
    log_lik = -float(F.cross_entropy(logits, y, reduction="sum"))
    truth = log_lik - 0.5 * float(theta @ theta) - 0.5 * float(log_det)
    rel = abs(evidence - truth) / abs(truth)
    return {
        "n": n,
        "evidence": evidence,
        "truth": truth,
        "rel": rel,
        "ntkgp_seconds": seconds,
        "ntkgp_cpu_seconds": cpu_seconds,
    }


# -------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["lastlayer", "resnet20", "transformer", "lstm", "tabular"])
    parser.add_argument("--exact-n", type=int, nargs="*", default=[200])
    parser.add_argument("--inducing-n", type=int, nargs="*", default=[5000])
    parser.add_argument("--num-inducing", type=int, default=50)
    parser.add_argument("--last-layer-n", type=int, default=5000)
    parser.add_argument("--peers", nargs="*", default=["lt last-layer kfac", "lt full kfac", "lt functional"])
    parser.add_argument("--check", nargs="*", default=[], help="brute-force checks: transformer, resnet20")
    parser.add_argument(
        "--check-n", type=int, help="points of the brute-force checks (default: 1000 transformer, 200 resnet20)"
    )
    parser.add_argument("--gram-n", type=int, default=32, help="points of resnet18's all-weights Gram")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    report, started = start_report(args)
    warnings.simplefilter("ignore")
    report["rows"] = []
    for name in args.tasks:
        if name == "lastlayer":
            row = {"task": name, **last_layer_target(args.last_layer_n)}
            print(row, flush=True)
            report["rows"].append(row)
            continue
        task = Task(name, torch.float32)
        if name == "resnet18":  # P = 11.2M: the last layer, layer4 + fc (inducing), and the Gram's rate
            row = {"task": name, "P": task.numel, "route": "all-weights Gram", **gram_rate(task, args.gram_n)}
            print(row, flush=True)
            report["rows"].append(row)
            inducing = ntkgp.solvers.Inducing(num_inducing=args.num_inducing)
            for label, kwargs in (
                ("ntkgp last layer", {"subnetwork": "last_layer"}),
                ("ntkgp layer4+fc inducing", {"subnetwork": ["layer4", "fc"], "solver": inducing}),
            ):
                row = {"task": name, "P": task.numel, "route": label, **ntkgp_row(task, args.last_layer_n, **kwargs)}
                print(row, flush=True)
                report["rows"].append(row)
            continue
        rows = [("ntkgp exact", n, {}) for n in args.exact_n]
        rows += [
            ("ntkgp inducing", n, {"solver": ntkgp.solvers.Inducing(num_inducing=args.num_inducing)})
            for n in args.inducing_n
        ]
        rows += [("ntkgp last layer", args.last_layer_n, {"subnetwork": "last_layer"})]
        for label, n, kwargs in rows:
            row = {"task": name, "P": task.numel, "route": label, **ntkgp_row(task, n, **kwargs)}
            print(row, flush=True)
            report["rows"].append(row)
        for kind in args.peers:
            n = args.last_layer_n if "last-layer" in kind else (args.exact_n[0] if args.exact_n else 200)
            row = {"task": name, "P": task.numel, "route": kind, **peer_row(task, n, kind)}
            print(row, flush=True)
            report["rows"].append(row)
    for name, n in (("transformer", 1000), ("resnet20", 200)):
        if name in args.check:
            row = {"task": name, "route": "brute force", **brute_force_check(name, args.check_n or n)}
            print(row, flush=True)
            report["rows"].append(row)
    finish_report(report, started, args.json)


if __name__ == "__main__":
    main()
