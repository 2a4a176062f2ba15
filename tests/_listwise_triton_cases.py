"""Triton listwise kernels vs the reference, run only under TRITON_INTERPRET=1 on CPU tensors.

Not collected by `pytest tests` (the name does not start with test_): test_listwise_triton.py
runs this file in a subprocess with TRITON_INTERPRET=1 set before triton is imported, so no
other test module sees an interpreted triton. Shapes are tiny because the interpreter runs
every program in Python: K = 1, 2 (edge cases), 7 (bf16) and 20 (one 32-wide tile, ragged
edge), B = 4 lists (full, empty, one item, random ragged).
"""

from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run me through test_listwise_triton.py"

from fastpref.ops.listwise import KINDS, PAIRWISE_KINDS, listwise_loss, listwise_loss_reference  # noqa: E402

CASES = [(k, w) for k in KINDS for w in ((None, "first") if k in PAIRWISE_KINDS else (None,))]
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 2e-2)}  # (atol, rtol) over the ref


def _make(K: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = (2 * torch.randn(4, K, generator=g)).to(dtype)
    relevance = torch.randint(0, 4, (4, K), generator=g).float()
    mask = torch.rand(4, K, generator=g) > 0.3
    mask[0] = True
    mask[1] = False
    mask[2] = False
    mask[2, 0] = True
    return scores, relevance, mask


def _run(fn, scores, relevance, mask, **kw):
    x = scores.clone().requires_grad_(True)
    loss = fn(x, relevance, mask, **kw)
    (loss * torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)).sum().backward()
    return loss.detach().double(), x.grad.double()


@pytest.mark.parametrize(
    "K,dtype", [(1, torch.float32), (2, torch.float32), (20, torch.float32), (7, torch.bfloat16)]
)
@pytest.mark.parametrize("kind,weighting", CASES)
def test_triton_three_way(kind, weighting, K, dtype):
    scores, relevance, mask = _make(K, dtype, seed=K)
    kw = dict(kind=kind, weighting=weighting, sigma=0.7)
    gt = _run(listwise_loss_reference, scores.double(), relevance, mask, **kw)
    ref = _run(listwise_loss_reference, scores, relevance, mask, **kw)
    got = _run(listwise_loss, scores, relevance, mask, backend="triton", **kw)
    atol, rtol = TOL[dtype]
    for g, r, t in zip(got, ref, gt, strict=True):
        assert ((g - t).abs() <= (r - t).abs() + atol + rtol * t.abs()).all(), (g, t)
    assert (got[0][1:3] == 0).all() and (got[1][1:3] == 0).all()


@pytest.mark.parametrize("kind,weighting", CASES)
def test_triton_no_mask_and_big_scores(kind, weighting):
    g = torch.Generator().manual_seed(11)
    scores = (torch.randint(0, 2, (2, 5), generator=g) * 2 - 1) * 1e4 + torch.randn(
        2, 5, generator=g
    )
    relevance = torch.randint(0, 3, (2, 5), generator=g).float()
    got = listwise_loss(scores, relevance, kind=kind, weighting=weighting, backend="triton")
    want = listwise_loss_reference(scores.double(), relevance, kind=kind, weighting=weighting)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kind,weighting", CASES)
def test_triton_several_tiles(kind, weighting):
    """K = 37 with 16-wide tiles: three tiles per side, the last one ragged."""
    from fastpref.kernels.listwise import listwise_fwd

    scores, relevance, mask = _make(37, torch.float32, seed=37)
    codes = (KINDS[kind], 1 if weighting else 0, 0.7)
    loss, grad = listwise_fwd(scores, relevance, mask, *codes, block=16)
    want = torch.ops.fastpref_C.listwise_fwd(scores, relevance, mask, *codes)
    torch.testing.assert_close(loss, want[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, want[1], rtol=2e-5, atol=2e-6)


def test_triton_listmle_ordered_gaps_of_100():
    s = torch.tensor([[300.0, 200.0, 100.0, 0.0]], requires_grad=True)
    loss = listwise_loss(s, torch.tensor([[3.0, 2.0, 1.0, 0.0]]), kind="listmle", backend="triton")
    loss.sum().backward()
    assert 0 <= loss.item() < 1e-30 and torch.isfinite(s.grad).all()
