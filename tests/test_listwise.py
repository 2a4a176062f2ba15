"""fastpref.listwise_loss: the C++ CPU kernels (both schedules), chunked backend, reference.

The Triton kernels are checked in test_listwise_triton.py (a subprocess under TRITON_INTERPRET=1),
the CUDA source is compiled by nvcc in test_listwise_cuda.py.

Shapes: K = 1 (no pair), 2 (one pair), 20 (RankLLM's window) and 100 (large lists, many ties with
4 relevance grades) with B = 6 lists: a full list, an empty one, a one-item one and random
ragged masks, so every masking branch runs in every case; relevance in {0..3} gives ties.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpref
from fastpref.ops import listwise as lw
from fastpref.ops.listwise import KINDS, listwise_loss, listwise_loss_reference

CASES = [
    (kind, weighting)
    for kind in KINDS
    for weighting in ((None, "first") if kind in lw.PAIRWISE_KINDS else (None,))
]
# kernel error must be within the reference's own error in that dtype plus this.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 2e-2)}  # (atol, rtol)


def _make(B: int, K: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = (2 * torch.randn(B, K, generator=g)).to(dtype)
    relevance = torch.randint(0, 4, (B, K), generator=g).float()
    mask = torch.rand(B, K, generator=g) > 0.3
    mask[0] = True
    mask[1] = False
    mask[2] = False
    mask[2, 0] = True
    return scores, relevance, mask


def _loss_and_grad(fn, scores, relevance, mask, **kw):
    x = scores.detach().clone().requires_grad_(True)
    loss = fn(x, relevance, mask, **kw)
    # a non-uniform upstream gradient, so backward's scaling by grad_loss is checked
    upstream = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad


def _three_way(kernel: torch.Tensor, ref: torch.Tensor, gt: torch.Tensor, dtype, what: str):
    atol, rtol = TOL[dtype]
    err_kernel = (kernel.double() - gt.double()).abs()
    bound = (ref.double() - gt.double()).abs() + atol + rtol * gt.double().abs()
    excess = (err_kernel - bound).max().item()
    assert excess <= 0, f"{what}: kernel error exceeds the reference's by {excess:.3g}"


def _itemwise(scores, relevance, mask, *, kind, weighting, sigma):
    """The CUDA kernels' per-thread schedule of listwise_math.h, run by the C++ CPU build."""
    return lw._listwise_fwd(scores, relevance, mask, KINDS[kind], lw.WEIGHTINGS[weighting],
                            sigma, "itemwise")[0]  # fmt: skip


@pytest.mark.parametrize("K", [1, 2, 20, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "chunked", "itemwise"])
@pytest.mark.parametrize("kind,weighting", CASES)
def test_three_way(kind, weighting, backend, dtype, K):
    scores, relevance, mask = _make(6, K, dtype, seed=K)
    kw = dict(kind=kind, weighting=weighting, sigma=0.7)
    gt = _loss_and_grad(listwise_loss_reference, scores.double(), relevance, mask, **kw)
    ref = _loss_and_grad(listwise_loss_reference, scores, relevance, mask, **kw)
    if backend == "itemwise":
        got = _loss_and_grad(_itemwise, scores, relevance, mask, **kw)
    else:
        got = _loss_and_grad(listwise_loss, scores, relevance, mask, backend=backend, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    _three_way(got[0], ref[0], gt[0], dtype, "loss")
    _three_way(got[1], ref[1], gt[1], dtype, "d scores")
    assert torch.all(got[0][1:3] == 0) and torch.all(got[1][1:3] == 0)  # < 2 real items


@pytest.mark.parametrize("kind,weighting", CASES)
def test_no_mask_equals_all_true_mask(kind, weighting):
    scores, relevance, _ = _make(4, 9, torch.float32, seed=1)
    full = torch.ones_like(scores, dtype=torch.bool)
    a = listwise_loss(scores, relevance, kind=kind, weighting=weighting)
    b = listwise_loss(scores, relevance, full, kind=kind, weighting=weighting)
    c = listwise_loss_reference(scores, relevance, kind=kind, weighting=weighting)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", ["cpu", "chunked"])
@pytest.mark.parametrize("kind,weighting", CASES)
def test_gradcheck_float64(kind, weighting, backend):
    g = torch.Generator().manual_seed(7)
    # scores well apart so the detached rank-based weights stay put under the finite difference
    scores = (torch.randperm(5 * 6, generator=g).reshape(5, 6) * 0.37).double()
    scores.requires_grad_(True)
    relevance = torch.randint(0, 3, (5, 6), generator=g).double()
    mask = torch.rand(5, 6, generator=g) > 0.2
    mask[4] = False
    mask[4, 2] = True
    fn = lambda s: listwise_loss(s, relevance, mask, kind=kind, weighting=weighting, sigma=1.3,
                                 backend=backend)  # fmt: skip
    assert fn(scores).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (scores,))


def test_hand_ranknet():
    """s = [0, 0], r = [1, 0]: one pair, softplus(0) = ln 2, d/ds = [-sigmoid(0), +sigmoid(0)].

    s = [2, 0, 1], r = [2, 1, 0]: pairs (0,1), (0,2), (1,2) with s_i - s_j = 2, 1, -1:
    softplus(-2) + softplus(-1) + softplus(1) = 0.126928 + 0.313262 + 1.313262 = 1.753452.
    FIRST: gold ranks 1, 2, 3 -> weights 1/3, 1/4, 1/5:
    0.126928/3 + 0.313262/4 + 1.313262/5 = 0.042309 + 0.078316 + 0.262652 = 0.383277.
    """
    for backend in ("reference", "cpu", "chunked"):
        s = torch.zeros(1, 2, requires_grad=True)
        loss = listwise_loss(s, torch.tensor([[1.0, 0.0]]), kind="ranknet", backend=backend)
        loss.sum().backward()
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        torch.testing.assert_close(s.grad, torch.tensor([[-0.5, 0.5]]))
        s3, r3 = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[2.0, 1.0, 0.0]])
        got = listwise_loss(s3, r3, kind="ranknet", backend=backend)
        assert got.item() == pytest.approx(1.753452, abs=1e-5)
        got = listwise_loss(s3, r3, kind="ranknet", weighting="first", backend=backend)
        assert got.item() == pytest.approx(0.383277, abs=1e-5)


def test_hand_lambda_and_lipo():
    """s = [0, 1], r = [2, 0]: G = 2^r - 1 = [3, 0]; by score item 1 is ranked 1st, item 0 2nd,
    so 1/D = [1/log2(3), 1/log2(2)] = [0.630930, 1]; |dG| * |d(1/D)| = 3 * 0.369070 = 1.107210.
    IDCG = 3/log2(2) + 0 = 3. The only pair (0 over 1) has softplus(-(0 - 1)) = 1.313262, so
    lipo = 1.107210 * 1.313262 = 1.454056 and lambda = lipo / IDCG = 0.484685.
    """
    s, r = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    for backend in ("reference", "cpu", "chunked"):
        lipo = listwise_loss(s, r, kind="lipo", backend=backend).item()
        lam = listwise_loss(s, r, kind="lambda", backend=backend).item()
        assert lipo == pytest.approx(1.454056, abs=1e-5)
        assert lam == pytest.approx(0.484685, abs=1e-5)


def test_hand_listnet_and_listmle():
    """ListNet, s = [0, 0], r = [ln 3, 0]: target softmax(r) = [3/4, 1/4], softmax(s) = [1/2, 1/2],
    loss = -(3/4 + 1/4) ln(1/2) = ln 2, d/ds = softmax(s) - target = [-1/4, 1/4].

    ListMLE, s = [0, 0, 0], r = [2, 1, 0]: ln 3 + ln 2 + ln 1 = ln 6; d/ds at position k is
    sum_{k' <= k} 1/(3 - k') - 1 = [1/3 - 1, 1/3 + 1/2 - 1, 1/3 + 1/2 + 1 - 1] = [-2/3, -1/6, 5/6].
    """
    for backend in ("reference", "cpu", "chunked"):
        s = torch.zeros(1, 2, requires_grad=True)
        loss = listwise_loss(s, torch.tensor([[math.log(3), 0.0]]), kind="listnet",
                             backend=backend)  # fmt: skip
        loss.sum().backward()
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        torch.testing.assert_close(s.grad, torch.tensor([[-0.25, 0.25]]))
        s = torch.zeros(1, 3, requires_grad=True)
        loss = listwise_loss(s, torch.tensor([[2.0, 1.0, 0.0]]), kind="listmle", backend=backend)
        loss.sum().backward()
        assert loss.item() == pytest.approx(math.log(6), abs=1e-6)
        torch.testing.assert_close(s.grad, torch.tensor([[-2 / 3, -1 / 6, 5 / 6]]))


def test_first_reproduces_released_mean_and_matches_plain_formula():
    """FIRST's code averages its 1/(r_i + r_j)-weighted logistic pair losses: our sum / #pairs."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 8, generator=g)
    r = torch.stack([torch.randperm(8, generator=g) for _ in range(3)]).float()  # a permutation
    rank = 1 + (r[:, None, :] > r[:, :, None]).sum(-1).float()  # 1-based gold rank
    pairs = r[:, :, None] > r[:, None, :]
    w = 1.0 / (rank[:, :, None] + rank[:, None, :])
    x = s[:, :, None] - s[:, None, :]
    expected = (w * F.softplus(-x) * pairs).sum((1, 2)) / pairs.sum((1, 2))
    got = listwise_loss(s, r, kind="ranknet", weighting="first") / pairs.sum((1, 2))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", ["cpu", "chunked", "reference"])
def test_stable_numerics(backend):
    # a perfectly ordered list with score gaps of 100: ListMLE ~ 0 with finite, ~0 gradients
    s = torch.tensor([[300.0, 200.0, 100.0, 0.0]], requires_grad=True)
    r = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    loss = listwise_loss(s, r, kind="listmle", backend=backend)
    loss.sum().backward()
    assert 0 <= loss.item() < 1e-30
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e-30
    # scores of +-1e4: finite losses and gradients for every kind
    g = torch.Generator().manual_seed(5)
    big = (torch.randint(0, 2, (4, 9), generator=g) * 2 - 1) * 1e4 + torch.randn(4, 9, generator=g)
    rel = torch.randint(0, 4, (4, 9), generator=g).float()
    for kind, weighting in CASES:
        x = big.clone().requires_grad_(True)
        loss = listwise_loss(x, rel, kind=kind, weighting=weighting, backend=backend)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), (kind, weighting)
        want = listwise_loss_reference(big.double(), rel, kind=kind, weighting=weighting)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-3)


def test_relevance_gets_no_gradient_and_sigma_scales():
    s = torch.randn(3, 5, requires_grad=True)
    r = torch.randn(3, 5, requires_grad=True)
    loss = listwise_loss(s, r, kind="ranknet", sigma=2.0)
    loss.sum().backward()
    assert r.grad is None and s.grad is not None
    torch.testing.assert_close(loss, listwise_loss(2 * s.detach(), r.detach(), kind="ranknet"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(dtype, with_mask):
    scores, relevance, mask = _make(5, 7, torch.float32, seed=2)
    scores = scores.to(dtype).requires_grad_(True)
    for kind, weighting in (("ranknet", 1), ("lambda", 0), ("listmle", 0)):
        args = (scores, relevance, mask if with_mask else None, KINDS[kind], weighting, 0.9, "cpu")
        torch.library.opcheck(torch.ops.fastpref.listwise_fwd.default, args)


def test_torch_compile_fullgraph():
    scores, relevance, mask = _make(4, 6, torch.float32, seed=4)

    def fn(s):
        return listwise_loss(s, relevance, mask, kind="lambda", backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    x, y = scores.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    compiled(x).sum().backward()
    fn(y).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_exported():
    assert fastpref.listwise_loss is listwise_loss
    assert "listwise_loss" in fastpref.ops.__all__


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda s, r: listwise_loss(s, r[:, :3], kind="ranknet"), ValueError, "relevance"),
        (lambda s, r: listwise_loss(s[0], r[0], kind="ranknet"), ValueError, "scores"),
        (lambda s, r: listwise_loss(s.long(), r, kind="ranknet"), TypeError, "scores"),
        (lambda s, r: listwise_loss(s, r, r[:, :2] > 0, kind="ranknet"), ValueError, "mask"),
        (lambda s, r: listwise_loss(s, r, kind="lambdamart"), ValueError, "kind"),
        (lambda s, r: listwise_loss(s, r, kind="ranknet", weighting="last"), ValueError,
         "weighting"),
        (lambda s, r: listwise_loss(s, r, kind="listnet", weighting="first"), ValueError,
         "weighting"),
        (lambda s, r: listwise_loss(s, r, kind="ranknet", sigma=0.0), ValueError, "sigma"),
        (lambda s, r: listwise_loss(s, r, kind="ranknet", backend="tpu"), ValueError, "backend"),
    ],
)  # fmt: skip
def test_bad_input(call, exc, match):
    s, r = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(exc, match=match):
        call(s, r)


@pytest.mark.parametrize("backend", ["cpu", "chunked", "reference"])
def test_nan_relevance_is_an_error_unless_masked(backend):
    s, r = torch.randn(2, 4), torch.randn(2, 4)
    r[1, 2] = float("nan")
    with pytest.raises(ValueError, match="relevance"):
        listwise_loss(s, r, kind="lambda", backend=backend)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False  # a NaN in padding is fine
    assert torch.isfinite(listwise_loss(s, r, mask, kind="lambda", backend=backend)).all()


def test_cuda_k_limit_is_a_clear_error():
    lw._check_cuda_limit(lw.CUDA_MAX_K)
    with pytest.raises(ValueError, match=r"scores has K=1025.*limit of 1024"):
        lw._check_cuda_limit(lw.CUDA_MAX_K + 1)


def test_raw_kernel_checks_name_the_argument():
    s = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="relevance must be"):
        torch.ops.fastpref_C.listwise_fwd(s, s[:, :3], None, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="unknown kind"):
        torch.ops.fastpref_C.listwise_fwd(s, s, None, 9, 0, 1.0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    K=st.integers(2, 12),
    seed=st.integers(0, 2**16),
    case=st.sampled_from(CASES),
)
def test_property_permuting_items_permutes_gradients(K, seed, case):
    """Items have no order: permuting a list's items (scores, relevance and mask together)
    leaves its loss unchanged and permutes its gradient, for every kind. Scores are distinct
    (ties in score are broken by index for lambda's ranks) and, for ListMLE, so is relevance."""
    kind, weighting = case
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, K, generator=g, dtype=torch.float64)
    relevance = torch.randint(0, 3, (3, K), generator=g).double()
    if kind == "listmle":
        relevance = torch.stack([torch.randperm(K, generator=g) for _ in range(3)]).double()
    mask = torch.rand(3, K, generator=g) > 0.25
    perm = torch.randperm(K, generator=g)
    a = _loss_and_grad(listwise_loss, scores, relevance, mask, kind=kind, weighting=weighting)
    b = _loss_and_grad(listwise_loss, scores[:, perm], relevance[:, perm], mask[:, perm],
                       kind=kind, weighting=weighting)  # fmt: skip
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1][:, perm], b[1])
