"""The lower-block-triangle Gram accumulation against a full GEMM, and the GGN built with it."""

from __future__ import annotations

import pytest
import torch

from ntkgp.linalg import symmetric_gram
from ntkgp.linalg.symmetric_gram import add_lower_gram, mirror_lower


@pytest.mark.parametrize("P", [1, 7, 512, 513, 1300])
def test_lower_gram_over_chunks_equals_the_full_product(P: int) -> None:
    """Three chunks of rows accumulated, then mirrored: ``A^T A`` to float64 round-off and exactly symmetric,
    for widths below, at and across the block size."""
    g = torch.Generator().manual_seed(P)
    chunks = [torch.randn(n, P, dtype=torch.float64, generator=g) for n in (5, 40, 1)]
    out = torch.zeros(P, P, dtype=torch.float64)
    for a in chunks:
        add_lower_gram(out, a)
    mirror_lower(out)
    whole = torch.cat(chunks)
    want = whole.T @ whole
    assert torch.equal(out, out.T)
    assert float((out - want).abs().max()) <= 1e-13 * float(want.abs().max())


def test_lower_gram_writes_only_the_lower_block_triangle() -> None:
    """Before the mirror, every block above the diagonal blocks is untouched (so the mirror must run)."""
    P, block = 1100, symmetric_gram.BLOCK
    out = torch.zeros(P, P, dtype=torch.float64)
    add_lower_gram(out, torch.randn(3, P, dtype=torch.float64))
    assert not out[:block, block:].any() and out[block:, :block].any()


def test_mirror_lower_takes_every_block_from_the_lower_triangle_batched() -> None:
    """A batched, nowhere-symmetric matrix becomes its lower triangle mirrored, diagonal blocks included
    (a GEMM's diagonal block is symmetric only up to its BLAS kernel's round-off)."""
    n = symmetric_gram.BLOCK + 37
    a = torch.randn(2, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = a.tril() + a.tril(-1).mT
    mirror_lower(a)
    assert torch.equal(a, want)
