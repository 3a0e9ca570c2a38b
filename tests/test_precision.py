"""TF32 stays off inside ntkgp's network passes on CUDA, whatever the user's settings, and the
user's settings are restored afterwards. (Skipped without CUDA: CPUs have no TF32.)"""

from __future__ import annotations

import pytest
import torch
from builders import make_ntk
from torch import nn

from ntkgp.ntk import gram
from ntkgp.precision import ieee_float32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists only on CUDA")


def _gram(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ntk, inputs = make_ntk(net, x, budget=2**28)
    return gram(ntk, inputs)[0]


def _set_tf32(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_user_tf32_does_not_reach_the_gram() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 3))
    net = net.cuda().eval()
    x = torch.randn(256, 64, device="cuda")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        _set_tf32(False, False)
        ieee_out, ieee_gram = net(x), _gram(net, x)
        _set_tf32(True, True)
        tf32_out = net(x)  # the user's own call: TF32
        gram = _gram(net, x)  # ntkgp's: IEEE float32 regardless
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        _set_tf32(*saved)
    tf32_err = float((tf32_out - ieee_out).abs().max() / ieee_out.abs().max())
    if tf32_err < 1e-6:
        pytest.skip("this GPU did not use TF32 for the test's matmuls")
    err = float((gram - ieee_gram).abs().max() / ieee_gram.abs().max())
    assert err < 1e-3 * tf32_err, f"Gram moved by {err:.2e} under TF32 (a TF32 forward moves by {tf32_err:.2e})"


def test_context_restores_the_flags() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    a = torch.randn(512, 512, device="cuda")
    with ieee_float32():
        inside = a @ a
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert torch.allclose(inside.double(), a.double() @ a.double(), rtol=0, atol=1e-3)
