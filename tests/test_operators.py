"""The lazy operators against linear_operator's generic test cases.

Each operator is compared with its dense truth built from brute-force Jacobians
(``truth.jacobian``), over linear_operator's full battery: matmuls, solves, log-determinants,
root decompositions, indexing, gradients w.r.t. the prior precisions, and so on.
"""

from __future__ import annotations

import contextlib
import unittest

import linear_operator
import pytest
import torch
import truth
from builders import make_ntk
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase, RectangularLinearOperatorTestCase

from ntkgp import JacobianLinearOperator, NTKLinearOperator
from ntkgp.network import Inputs
from ntkgp.ntk import EmpiricalNTK

N, D, C = 6, 3, 2


class Float64Case:
    """Run linear_operator's generic cases in float64 (the harness draws rhs in the default dtype).

    The cases assume linear_operator's default settings, which BoTorch changes process-wide when it is
    imported (fast computations off): they are switched back on for each case.
    """

    def setUp(self) -> None:
        self._dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        settings = contextlib.ExitStack()
        settings.enter_context(linear_operator.settings.fast_computations(True, True, True))
        self.addCleanup(settings.close)
        super().setUp()

    def tearDown(self) -> None:
        torch.set_default_dtype(self._dtype)
        super().tearDown()


def _network(prior: object = 1.0) -> tuple[EmpiricalNTK, torch.nn.Module, torch.Tensor]:
    net = truth.mlp(D, 5, C, seed=21)  # P = 3*5 + 5 + 5*2 + 2 = 32 > N*C = 12: a positive-definite NTK
    x = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    return make_ntk(net, x, prior, budget=2**24)[0], net, x


class TestJacobianLinearOperator(Float64Case, RectangularLinearOperatorTestCase, unittest.TestCase):
    seed = 0

    def create_linear_op(self) -> JacobianLinearOperator:
        ntk, _, x = _network()
        return JacobianLinearOperator(ntk=ntk, x=Inputs.wrap(x))

    def evaluate_linear_op(self, linear_op: JacobianLinearOperator) -> torch.Tensor:
        _, net, x = _network()
        return truth.jacobian(net, x)

    # The Jacobian operator has no differentiable parameters (the harness's checks differentiate
    # through them); check values and the gradient with respect to the right-hand side instead.
    def _test_matmul(self, rhs: torch.Tensor) -> None:
        self._check_product(rhs, transpose=False)

    def _test_rmatmul(self, lhs: torch.Tensor) -> None:
        self._check_product(lhs, transpose=True)

    def _check_product(self, other: torch.Tensor, transpose: bool) -> None:
        linear_op = self.create_linear_op()
        evaluated = self.evaluate_linear_op(linear_op)
        if not isinstance(other, torch.Tensor):  # a LinearOperator right-hand side: values only
            res = (other @ linear_op) if transpose else (linear_op @ other)
            actual = (other.to_dense() @ evaluated) if transpose else (evaluated @ other.to_dense())
            self.assertAllClose(res.to_dense(), actual)
            return
        other = other.detach().clone().requires_grad_(True)
        other_copy = other.detach().clone().requires_grad_(True)
        res = (other @ linear_op) if transpose else (linear_op @ other)
        actual = (other_copy @ evaluated) if transpose else (evaluated @ other_copy)
        self.assertAllClose(res.to_dense() if hasattr(res, "to_dense") else res, actual)
        grad = torch.randn_like(actual)
        (res.to_dense() if hasattr(res, "to_dense") else res).backward(gradient=grad)
        actual.backward(gradient=grad)
        self.assertAllClose(other.grad, other_copy.grad, **self.tolerances["matmul"])


class TestNTKLinearOperator(Float64Case, LinearOperatorTestCase, unittest.TestCase):
    seed = 0
    should_test_sample = True
    # Exact by default: solves and log-determinants use a Cholesky whenever the kernel fits in
    # memory, so CG is not called. (linear_operator's CG/SLQ path is 69% off on this NTK's logdet.)
    should_call_cg = False

    def create_linear_op(self) -> NTKLinearOperator:
        ntk, _, x = _network(torch.tensor([0.5, 2.0, 1.0, 4.0]))
        delta = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
        inputs = Inputs.wrap(x)
        return NTKLinearOperator(delta, ntk=ntk, x1=inputs, x2=inputs)

    def evaluate_linear_op(self, linear_op: NTKLinearOperator) -> torch.Tensor:
        _, net, x = _network()
        j = truth.jacobian(net, x)
        delta = linear_op.prior_precision
        prior = torch.cat([d.expand(n) for d, n in zip(delta, linear_op.ntk.network.numels)])
        return (j / prior) @ j.T


class TestNTKCrossOperator(Float64Case, RectangularLinearOperatorTestCase, unittest.TestCase):
    """K(X1, X2) with X1 != X2, rectangular."""

    seed = 0

    def create_linear_op(self) -> NTKLinearOperator:
        ntk, _, x = _network(0.7)
        delta = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
        return NTKLinearOperator(delta, ntk=ntk, x1=Inputs.wrap(x), x2=Inputs.wrap(x[:4] * 2))

    def evaluate_linear_op(self, linear_op: NTKLinearOperator) -> torch.Tensor:
        _, net, x = _network()
        return truth.jacobian(net, x) @ truth.jacobian(net, x[:4] * 2).T / linear_op.prior_precision


def test_operators_stay_on_the_network_device() -> None:
    """``op.to(device)`` with another device raises, however the device is spelt (a string was ignored)."""
    ntk, _, x = _network()
    inputs = Inputs.wrap(x)
    op = NTKLinearOperator(torch.ones(1, dtype=torch.float64), ntk=ntk, x1=inputs, x2=inputs)
    assert op.to("cpu") is op and op.to(torch.device("cpu")) is op and op.to(torch.float64) is op
    for other in ("meta", torch.device("meta")):
        with pytest.raises(ValueError, match="network's device"):
            op.to(other)
    with pytest.raises(ValueError, match="network's device"):
        op.to(device="meta")


def test_ntk_matmul_forms_no_dense_jacobian(monkeypatch) -> None:
    """A matvec uses vjp/jvp only: the per-example Jacobian is never computed."""
    ntk, net, x = _network()
    inputs = Inputs.wrap(x)
    op = NTKLinearOperator(torch.ones(1, dtype=torch.float64), ntk=ntk, x1=inputs, x2=inputs)

    def forbidden(*args, **kwargs):
        raise AssertionError("jacobian() called in a matvec")

    monkeypatch.setattr(ntk.network, "jacobian", forbidden)
    v = torch.randn(N * C, 3, dtype=torch.float64)
    j = truth.jacobian(net, x)
    assert torch.allclose(op @ v, j @ (j.T @ v), rtol=1e-10, atol=1e-12)


def test_chunking_does_not_change_results() -> None:
    net = truth.mlp(D, 5, C, seed=21)
    x = torch.randn(11, D, dtype=torch.float64)
    delta = torch.ones(1, dtype=torch.float64)
    inputs = Inputs.wrap(x)
    ops = [
        NTKLinearOperator(delta, ntk=make_ntk(net, x, chunk_size=cs, budget=b)[0], x1=inputs, x2=inputs)
        for cs, b in [(None, 2**26), (3, 600), (1, 1)]
    ]
    dense = [op.to_dense() for op in ops]
    diag = [op.diagonal() for op in ops]
    v = torch.randn(11 * C, 2, dtype=torch.float64)
    mv = [op @ v for op in ops]
    for i in (1, 2):
        assert torch.allclose(dense[0], dense[i], rtol=1e-12, atol=1e-12)
        assert torch.allclose(diag[0], diag[i], rtol=1e-12, atol=1e-12)
        assert torch.allclose(mv[0], mv[i], rtol=1e-12, atol=1e-12)
