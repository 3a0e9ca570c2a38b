"""The Cholesky helpers against torch's own dense routines, in float64."""

from __future__ import annotations

import torch

from ntkgp.cholesky import cholesky_logdet, cholesky_solve


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
