"""Independent float64 truths for the tests: brute-force weight-space linear algebra.

Nothing here uses ntkgp. Jacobians come from ``torch.autograd.functional.jacobian`` (not
torch.func), and posteriors are formed by explicit inverses of the ``P x P`` posterior
precision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call


def mlp(d_in: int, hidden: int, d_out: int, *, depth: int = 1, seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers).to(dtype)


def toy_regression(n: int, d: int, c: int = 1, *, seed: int = 0, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, c, generator=g, dtype=dtype)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, c, generator=g, dtype=dtype)
    return x, (y[:, 0] if c == 1 else y)


def prior_vector(net: nn.Module, delta: float | list[float]) -> Tensor:
    """Per-parameter prior precision, ``(P,)``: scalar or one value per parameter tensor."""
    params = [p for p in net.parameters() if p.requires_grad]
    if isinstance(delta, (int, float)):
        delta = [float(delta)] * len(params)
    return torch.cat([torch.full((p.numel(),), float(d), dtype=torch.float64) for p, d in zip(params, delta)])


def train_map(net: nn.Module, x: Tensor, y: Tensor, prior: Tensor, noise: Tensor | float, *, iters: int = 8) -> float:
    """Fit ``net`` to the MAP of sum_c ||y_c - f_c||^2 / (2 s_c) + theta^T diag(prior) theta / 2 by LBFGS.

    Returns the final gradient norm (the tests need a tight MAP: the GP/Laplace identities
    hold exactly only there).
    """
    params = [p for p in net.parameters() if p.requires_grad]
    y2 = y.reshape(x.shape[0], -1)
    noise = torch.as_tensor(noise, dtype=x.dtype)
    opt = torch.optim.LBFGS(
        params, max_iter=1000, tolerance_grad=1e-13, tolerance_change=0, history_size=100, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        out = net(x).reshape(x.shape[0], -1)
        theta = torch.cat([p.reshape(-1) for p in params])
        loss = ((out - y2).square() / (2 * noise)).sum() + 0.5 * (prior.to(x.dtype) * theta.square()).sum()
        loss.backward()
        return loss

    for _ in range(iters):
        opt.step(closure)
    if sum(p.numel() for p in params) <= 2000:
        _newton_refine(net, params, x, y2, prior, noise)
    closure()
    return float(torch.cat([p.grad.reshape(-1) for p in params]).norm())


def _newton_refine(
    net: nn.Module, params: list[nn.Parameter], x: Tensor, y2: Tensor, prior: Tensor, noise: Tensor, steps: int = 4
) -> None:
    """Exact Newton steps on the MAP objective: quadratic convergence to round-off."""
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]

    def objective(theta: Tensor) -> Tensor:
        chunks = torch.split(theta, [s.numel() for s in shapes])
        ps = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        out = functional_call(net, ps, (x,)).reshape(x.shape[0], -1)
        return ((out - y2).square() / (2 * noise)).sum() + 0.5 * (prior.to(x.dtype) * theta.square()).sum()

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    for _ in range(steps):
        grad = torch.autograd.functional.jacobian(objective, theta)
        hess = torch.autograd.functional.hessian(objective, theta)
        theta = theta - torch.linalg.solve(hess, grad)
    with torch.no_grad():
        for p, c in zip(params, torch.split(theta, [s.numel() for s in shapes])):
            p.copy_(c.reshape(p.shape))


def jacobian(net: nn.Module, x: Tensor) -> Tensor:
    """``J(x)``, ``(N*C, P)``, point-major rows, float64, by torch.autograd.functional."""
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    values = tuple(dict(net.named_parameters())[n].detach() for n in names)

    def f(*ps: Tensor) -> Tensor:
        return functional_call(net, dict(zip(names, ps)), (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, values)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1).to(torch.float64)


def flat_params(net: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters() if p.requires_grad]).to(torch.float64)


def posterior_covariance(j_train: Tensor, j_test: Tensor, prior: Tensor, noise: Tensor) -> Tensor:
    """GLM predictive covariance J*(J^T S^-1 J + P0)^-1 J*^T with S = diag(noise) ``(N*C,)``."""
    precision = j_train.T @ (j_train / noise.unsqueeze(-1)) + torch.diag(prior)
    return j_test @ torch.linalg.inv(precision) @ j_test.T


def log_evidence(net: nn.Module, x: Tensor, y: Tensor, prior: Tensor, noise: Tensor) -> Tensor:
    """Exact log N(y; m(X), J P0^-1 J^T + S) with m = f - J theta_hat, in float64."""
    j = jacobian(net, x)
    with torch.no_grad():
        f = net(x).reshape(-1).to(torch.float64)
    mean = f - j @ flat_params(net)
    cov = j @ torch.diag(1 / prior) @ j.T + torch.diag(noise)
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(y.reshape(-1).to(torch.float64))


def laplace_evidence(net: nn.Module, x: Tensor, y: Tensor, prior: Tensor, noise: Tensor) -> Tensor:
    """Weight-space Laplace (GGN) log marginal likelihood at the current weights."""
    j = jacobian(net, x)
    theta = flat_params(net)
    with torch.no_grad():
        r = y.reshape(-1).to(torch.float64) - net(x).reshape(-1).to(torch.float64)
    loglik = -0.5 * (r.square() / noise).sum() - 0.5 * torch.log(2 * math.pi * noise).sum()
    precision = j.T @ (j / noise.unsqueeze(-1)) + torch.diag(prior)
    log_det_ratio = torch.logdet(precision) - prior.log().sum()
    return loglik - 0.5 * (log_det_ratio + (prior * theta.square()).sum())


# ----------------------------------------------------------------- Laplace (non-Gaussian) truths
def train_map_loss(net: nn.Module, x: Tensor, nll, prior: Tensor, *, iters: int = 6, newton: int = 6) -> float:
    """MAP of ``nll(net(x)) + theta^T diag(prior) theta / 2`` by LBFGS then exact Newton; returns |grad|."""
    params = [p for p in net.parameters() if p.requires_grad]
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    opt = torch.optim.LBFGS(
        params, max_iter=500, tolerance_grad=1e-13, tolerance_change=0, history_size=100, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        theta = torch.cat([p.reshape(-1) for p in params])
        loss = nll(net(x)) + 0.5 * (prior * theta.square()).sum()
        loss.backward()
        return loss

    for _ in range(iters):
        opt.step(closure)

    def objective(theta: Tensor) -> Tensor:
        ps = {n: c.reshape(s) for n, c, s in zip(names, torch.split(theta, [s.numel() for s in shapes]), shapes)}
        return nll(functional_call(net, ps, (x,))) + 0.5 * (prior * theta.square()).sum()

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    for _ in range(newton):
        grad = torch.autograd.functional.jacobian(objective, theta)
        theta = theta - torch.linalg.solve(torch.autograd.functional.hessian(objective, theta), grad)
    with torch.no_grad():
        for p, c in zip(params, torch.split(theta, [s.numel() for s in shapes])):
            p.copy_(c.reshape(p.shape))
    closure()
    return float(torch.cat([p.grad.reshape(-1) for p in params]).norm())


def nll_hessians(per_point_nll, f: Tensor) -> Tensor:
    """Per-point Hessians ``(N, C, C)`` of ``per_point_nll(f_n, n)`` w.r.t. ``f_n``, by autograd."""
    return torch.stack(
        [
            torch.autograd.functional.hessian(lambda v, n=n: per_point_nll(v, n), f[n].detach())
            for n in range(f.shape[0])
        ]
    )


def ggn_laplace(
    net: nn.Module, x: Tensor, x_test: Tensor, hessians: Tensor, prior: Tensor, log_lik: Tensor
) -> tuple[Tensor, Tensor]:
    """Weight-space GGN Laplace: (log evidence, latent predictive covariance ``(N*C, N*C)``)."""
    j, jt = jacobian(net, x), jacobian(net, x_test)
    lam = torch.block_diag(*hessians)
    precision = j.T @ lam @ j + torch.diag(prior)
    theta = flat_params(net)
    evidence = log_lik - 0.5 * (prior * theta.square()).sum() - 0.5 * (torch.logdet(precision) - prior.log().sum())
    return evidence, jt @ torch.linalg.inv(precision) @ jt.T


# ----------------------------------------------------------------- inducing points (SGPR)
def point_rows(idx: Tensor, c: int) -> Tensor:
    """Rows ``n * c + k`` of the point-major ``(N*C,)`` layout for the points ``idx``."""
    return (idx[:, None] * c + torch.arange(c)).reshape(-1)


def sgpr(
    net: nn.Module, x: Tensor, y: Tensor, x_test: Tensor, prior: Tensor, idx: Tensor, noise: Tensor, jitter: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense SGPR (Titsias) with the points ``idx`` as inducing inputs, noise ``(C,)`` per output.

    Returns the collapsed bound, the predictive mean and covariance at ``x_test``, and the
    subset-of-regressors covariance ``K_*Z D^-1 K_Z*``. ``K_ZZ`` gets ``jitter`` times its mean
    diagonal.
    """
    C = y.reshape(x.shape[0], -1).shape[1]
    j, js = jacobian(net, x), jacobian(net, x_test)
    theta = flat_params(net)
    with torch.no_grad():
        f, fs = net(x).reshape(-1), net(x_test).reshape(-1)
    r = y.reshape(-1) - (f - j @ theta)
    var = 1 / prior
    k = j @ (var[:, None] * j.T)
    jz = j[point_rows(idx, C)]
    kzz = jz @ (var[:, None] * jz.T)
    kzz = kzz + jitter * kzz.diagonal().mean().detach() * torch.eye(kzz.shape[0], dtype=torch.float64)
    kxz = j @ (var[:, None] * jz.T)
    q = kxz @ torch.linalg.solve(kzz, kxz.T)
    s = noise.repeat(x.shape[0])
    bound = (
        torch.distributions.MultivariateNormal(torch.zeros_like(r), q + torch.diag(s)).log_prob(r)
        - 0.5 * ((k - q).diagonal() / s).sum()
    )
    d = kzz + kxz.T @ (kxz / s[:, None])
    ksz = js @ (var[:, None] * jz.T)
    mean = fs - js @ theta + ksz @ torch.linalg.solve(d, kxz.T @ (r / s))
    kss = js @ (var[:, None] * js.T)
    cov = kss - ksz @ (torch.linalg.solve(kzz, ksz.T) - torch.linalg.solve(d, ksz.T))
    return bound, mean, cov, ksz @ torch.linalg.solve(d, ksz.T)


# ----------------------------------------------------------------- any input form, any parameter subset
def jacobian_of(net: nn.Module, call, names: list[str] | None = None) -> Tensor:
    """``J`` ``(N*C, P)`` of ``call(f)`` where ``f(*args, **kwargs)`` is ``net`` at its current weights.

    ``call`` feeds ``f`` the inputs in their own form (tensor, tuple, dict) and returns the ``(N, C)``
    outputs. Only the parameters ``names`` (default: those requiring grad) are differentiated.
    """
    named = dict(net.named_parameters())
    names = names or [n for n, p in net.named_parameters() if p.requires_grad]
    values = tuple(named[n].detach() for n in names)

    def f(*ps: Tensor) -> Tensor:
        params = dict(zip(names, ps))
        return call(lambda *a, **k: functional_call(net, params, a, k)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, values)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1).to(torch.float64)


def gaussian_gp(j: Tensor, f: Tensor, theta: Tensor, y: Tensor, prior: Tensor, noise: Tensor, j_test: Tensor):
    """Exact GP of the linearized model in float64: (log evidence, predictive covariance at the test rows)."""
    mean = f.reshape(-1) - j @ theta
    cov = j @ torch.diag(1 / prior) @ j.T + torch.diag(noise)
    evidence = torch.distributions.MultivariateNormal(mean, cov).log_prob(y.reshape(-1).to(torch.float64))
    precision = j.T @ (j / noise.unsqueeze(-1)) + torch.diag(prior)
    return evidence, j_test @ torch.linalg.inv(precision) @ j_test.T


def ggn_laplace_from(j: Tensor, j_test: Tensor, hessians: Tensor, prior: Tensor, theta: Tensor, log_lik: Tensor):
    """Weight-space GGN Laplace from Jacobians: (log evidence, latent predictive covariance)."""
    precision = j.T @ torch.block_diag(*hessians) @ j + torch.diag(prior)
    evidence = log_lik - 0.5 * (prior * theta.square()).sum() - 0.5 * (torch.logdet(precision) - prior.log().sum())
    return evidence, j_test @ torch.linalg.inv(precision) @ j_test.T
