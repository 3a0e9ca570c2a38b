"""The Cholesky helpers against torch's own dense routines, in float64."""

from __future__ import annotations

import pytest
import torch

from ntkgp.linalg.cholesky import cholesky_logdet, cholesky_solve, factored_inv_quad_logdet


def _spd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def test_cholesky_logdet_value_and_gradient() -> None:
    matrix = _spd(30, 0).requires_grad_()
    value = cholesky_logdet(matrix, what="test matrix")
    assert torch.allclose(value, torch.logdet(matrix.detach()), rtol=1e-12)
    (grad,) = torch.autograd.grad(3.0 * value, matrix)
    assert torch.allclose(grad, 3.0 * torch.linalg.inv(matrix.detach()), rtol=1e-10, atol=1e-12)
    # through a parametrised matrix, as the subset bound uses it: d/dd log|A + d B| = tr((A + d B)^-1 B)
    a, b = _spd(20, 1), _spd(20, 2)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: cholesky_logdet(a + d * b, what="A + d B"), (scale,))


def test_cholesky_solve_matches_torch() -> None:
    matrix = _spd(40, 3)
    factor = torch.linalg.cholesky(matrix)
    rhs = torch.randn(40, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(cholesky_solve(rhs, factor), torch.cholesky_solve(rhs, factor), rtol=1e-12, atol=1e-12)
    assert torch.allclose(matrix @ cholesky_solve(rhs, factor), rhs, atol=1e-10)


def test_factored_inv_quad_logdet_values_and_gradients() -> None:
    """Against torch.logdet and dense solves under autograd: three right-hand sides, gradients through a
    parametrised A and through B, B alone (no A), and a refused second derivative."""
    a, b = _spd(25, 5), _spd(25, 6)
    rhs0 = torch.randn(25, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def loss(fast: bool, d: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        matrix = a + d * b
        if fast:
            quad, logdet = factored_inv_quad_logdet(torch.linalg.cholesky(matrix.detach()), rhs, matrix)
        else:
            quad, logdet = (rhs * torch.linalg.solve(matrix, rhs)).sum(0), torch.logdet(matrix)
        return (weights * quad).sum() + 3.0 * logdet

    values, grads = [], []
    for fast in (True, False):
        d = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
        rhs = rhs0.clone().requires_grad_(True)
        value = loss(fast, d, rhs)
        values.append(value.detach())
        grads.append(torch.autograd.grad(value, (d, rhs)))
    assert torch.allclose(values[0], values[1], rtol=1e-12)
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-10)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)

    matrix = a + 0.4 * b
    rhs = rhs0.clone().requires_grad_(True)
    quad, _ = factored_inv_quad_logdet(torch.linalg.cholesky(matrix), rhs)  # no A: gradient through B only
    (g_rhs,) = torch.autograd.grad((weights * quad).sum(), rhs)
    assert torch.allclose(g_rhs, 2 * torch.linalg.solve(matrix, rhs0) * weights, rtol=1e-10, atol=1e-12)

    d = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):  # a graph of the backward is refused
        torch.autograd.grad(loss(True, d, rhs0), d, create_graph=True)
