"""fastpref.infonce against its materialising reference: loss and both gradients, three ways.

Method (STYLE.md, CCE's): truth = ``infonce_reference`` in float32; ``ref`` = the reference in
the test dtype; the fused op must be no further from the truth than ``ref`` plus ``TOL``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastpref.ops.infonce import infonce, infonce_reference

# Per dtype: (atol, rtol · max|truth|) allowed on top of the reference's own error in that dtype.
# bfloat16: rounding the unit vectors (2^-9) times 1/τ = 20 moves logits by ~0.04, i.e. ~2% of
# a gradient; a real bug (wrong positive, group or factor) is O(1).
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-3, 2e-2)}

BACKENDS = ["reference", "chunked", "cpu"]

# Why these shapes: one realistic-small RankPO layout (groups of 4), M not a multiple of any
# tile (203, prime-ish widths, D=31), a single query, a CLIP square batch, hard negatives with
# the symmetric term, and group-only softmaxes.
CASES = {
    #             B,   M,  D, options
    "groups": (32, 128, 64, {}),
    "odd": (37, 203, 31, {"random_pos": True}),
    "one_row": (1, 5, 7, {}),
    "clip": (16, 16, 24, {"symmetric": True}),
    "sym_hard_neg": (12, 36, 20, {"symmetric": True}),
    "sym_odd": (7, 19, 13, {"symmetric": True, "random_pos": True}),
    "group_only": (9, 27, 16, {"in_batch": False}),
    "group_only_pos": (6, 30, 11, {"in_batch": False, "group_pos": True}),
}


def _inputs(B: int, M: int, D: int, dtype: torch.dtype, opts: dict, normalize: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 if normalize else D**-0.5  # raw dot products of O(1), like trained embeddings
    q = torch.randn(B, D, generator=g) * scale
    p = torch.randn(M, D, generator=g) * scale
    p[: min(B, M)] += 0.5 * q[: min(B, M)]  # some signal so losses are not all ≈ log M
    pos = None
    if opts.get("random_pos"):
        pos = torch.randint(0, M, (B,), generator=g)
    if opts.get("group_pos"):
        G = M // B
        pos = torch.arange(B) * G + torch.randint(0, G, (B,), generator=g)
    upstream = torch.rand(B, generator=g) + 0.5  # any upstream gradient, not only ones
    return q.to(dtype), p.to(dtype), pos, upstream


def _run(fn, q, p, pos, upstream, **kw):
    q = q.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    loss = fn(q, p, pos, **kw)
    (loss * upstream).sum().backward()
    return loss.detach().float(), q.grad.float(), p.grad.float()


def _assert_three_way(out, ref, truth, dtype, what):
    """Mean error no worse than the reference's own plus TOL; max error within 2x of its max.

    Both sides round the normalised inputs to the test dtype and that error dominates in
    bfloat16 at τ = 0.05; the reference adds its own (rounded logits), which can by chance
    cancel the first in a few elements, hence the factor on the maximum. A real bug is O(1).
    """
    atol, rtol = TOL[dtype]
    for name, o, r, t in zip(("loss", "d_queries", "d_passages"), out, ref, truth, strict=True):
        assert o.shape == t.shape, f"{what} {name}: shape {tuple(o.shape)} != {tuple(t.shape)}"
        assert torch.isfinite(o).all(), f"{what} {name}: non-finite values"
        tol = atol + rtol * t.abs().max().item()
        err, ref_err = (o - t).abs(), (r - t).abs()
        tag = f"{what} {name}"
        assert err.mean() <= ref_err.mean() + tol, (
            f"{tag}: mean error {err.mean():.3g} > reference {ref_err.mean():.3g} + {tol:.3g}"
        )
        assert err.max() <= 2 * ref_err.max() + tol, (
            f"{tag}: max error {err.max():.3g} > 2 x reference {ref_err.max():.3g} + {tol:.3g}"
        )


# Group-only cases never reach linear_logprobs (an O(B·G) softmax), so one backend covers them.
# ("reference" is the materialising path itself, so comparing it here would be vacuous.)
KERNEL_RUNS = [
    (c, b)
    for c in CASES
    for b in ("chunked", "cpu")
    if CASES[c][3].get("in_batch", True) or b == "chunked"
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("case, backend", KERNEL_RUNS)
def test_matches_reference(case, backend, normalize, dtype):
    B, M, D, opts = CASES[case]
    kw = dict(
        temperature=0.05 if normalize else 0.5,
        normalize=normalize,
        symmetric=opts.get("symmetric", False),
        in_batch=opts.get("in_batch", True),
    )
    q, p, pos, up = _inputs(B, M, D, dtype, opts, normalize, seed=B * 1000 + M)
    truth = _run(infonce_reference, q.float(), p.float(), pos, up, **kw)
    ref = _run(infonce_reference, q, p, pos, up, **kw)
    out = _run(infonce, q, p, pos, up, backend=backend, **kw)
    assert out[0].dtype == torch.float32
    _assert_three_way(out, ref, truth, dtype, f"{case}/{backend}")


def test_hand_derived_value():
    """Orthonormal q = (e1, e2), P = (e1, e2), τ = 1: s(q_i, p_i) = 1, s(q_i, p_j≠i) = 0, so
    l_i = -1 + log(e^1 + e^0) = log(1 + e^-1) = 0.313262 for every i, in both directions
    (the symmetric average is the same number). Group-only with G = 1 has one candidate: l = 0.
    Unnormalised 2·e1 against itself with τ = 2: s = 4, l = -2 + log(e^2 + e^0) = log(1 + e^-2).
    """
    eye = torch.eye(2, 3)
    expected = math.log1p(math.exp(-1.0))
    for backend in BACKENDS:
        for symmetric in (False, True):
            loss = infonce(eye, eye, temperature=1.0, symmetric=symmetric, backend=backend)
            torch.testing.assert_close(loss, torch.full((2,), expected), rtol=1e-6, atol=1e-6)
    loss = infonce(eye, eye, temperature=1.0, in_batch=False)
    torch.testing.assert_close(loss, torch.zeros(2), rtol=0, atol=1e-7)
    loss = infonce(2 * eye, eye, temperature=2.0, normalize=False)
    torch.testing.assert_close(loss, torch.full((2,), math.log1p(math.exp(-1.0))))
    loss = infonce(2 * eye, 2 * eye, temperature=2.0, normalize=False)
    torch.testing.assert_close(loss, torch.full((2,), math.log1p(math.exp(-2.0))))


def test_default_positives_and_group_size():
    """Default positive_index = arange(B)·G with G = M // B: passages (q0, n, n, q1, n, n)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, generator=g)
    p = torch.randn(6, 8, generator=g)
    explicit = infonce_reference(q, p, torch.tensor([0, 3]))
    torch.testing.assert_close(infonce(q, p, backend="chunked"), explicit)
    torch.testing.assert_close(infonce(q, p, group_size=3, backend="chunked"), explicit)


def test_group_only_is_softmax_over_own_group():
    """in_batch=False equals an ordinary InfoNCE run on each query's group alone."""
    g = torch.Generator().manual_seed(1)
    B, G, D = 5, 4, 8
    q, p = torch.randn(B, D, generator=g), torch.randn(B * G, D, generator=g)
    pos = torch.arange(B) * G + torch.tensor([0, 3, 1, 2, 0])
    loss = infonce(q, p, pos, in_batch=False, temperature=0.1)
    for i in range(B):
        own = infonce_reference(
            q[i : i + 1], p[i * G : (i + 1) * G], pos[i : i + 1] - i * G, temperature=0.1
        )
        torch.testing.assert_close(loss[i : i + 1], own)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    for kw in ({}, {"symmetric": True}, {"in_batch": False}, {"normalize": False}):
        q = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
        p = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
        fn = lambda q, p, kw=kw: infonce(q, p, temperature=0.5, backend="chunked", **kw)
        assert torch.autograd.gradcheck(fn, (q, p)), kw


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
@pytest.mark.parametrize("frozen", ["queries", "passages"])
def test_frozen_tower(frozen, backend):
    """Either tower may be frozen (e.g. a fixed passage index): the other gets its gradient."""
    g = torch.Generator().manual_seed(3)
    q, p = torch.randn(4, 6, generator=g), torch.randn(8, 6, generator=g)
    trained = (p if frozen == "queries" else q).requires_grad_(True)
    expected = torch.autograd.grad(infonce_reference(q, p, symmetric=True).sum(), trained)[0]
    infonce(q, p, symmetric=True, backend=backend).sum().backward()
    torch.testing.assert_close(trained.grad, expected)


def test_no_grad_builds_no_graph():
    q = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        assert not infonce(q, torch.randn(8, 6), backend="chunked").requires_grad


@pytest.mark.parametrize(
    "kwargs, args, error, match",
    [
        ({"temperature": 0.0}, None, ValueError, "temperature"),
        ({"temperature": -0.1}, None, ValueError, "temperature"),
        ({"temperature": float("nan")}, None, ValueError, "temperature"),
        ({}, ((4, 8), (8, 7)), ValueError, "same dimension D"),
        ({}, ((4,), (8, 8)), ValueError, "queries must be"),
        ({}, ((4, 8), (8,)), ValueError, "passages must be"),
        ({}, ((4, 8), (10, 8)), ValueError, "group_size or positive_index"),
        ({"group_size": 3}, None, ValueError, "group_size=3"),
        ({"group_size": 0}, None, ValueError, "group_size"),
        (
            {"positive_index": torch.tensor([0, 1, 2, 8])},
            None,
            ValueError,
            r"positive_index\[3\] = 8 is outside \[0, M=8\)",
        ),
        (
            {"positive_index": torch.tensor([0, -1, 2, 3])},
            None,
            ValueError,
            r"positive_index\[1\] = -1",
        ),
        ({"positive_index": torch.tensor([0, 1])}, None, ValueError, "positive_index must be"),
        ({"positive_index": torch.zeros(4)}, None, TypeError, "positive_index must be integer"),
        (
            {"positive_index": torch.tensor([0, 2, 6, 6]), "in_batch": False},
            None,
            ValueError,
            r"positive_index\[2\] = 6 is outside query 2's group \[4, 6\)",
        ),
        ({"symmetric": True, "in_batch": False}, None, ValueError, "symmetric=True needs"),
        ({"gather": True}, None, RuntimeError, "torch.distributed"),
    ],
)
def test_bad_input(kwargs, args, error, match):
    q_shape, p_shape = args or ((4, 8), (8, 8))
    q, p = torch.randn(q_shape), torch.randn(p_shape)
    kwargs = dict(kwargs)
    pos = kwargs.pop("positive_index", None)
    with pytest.raises(error, match=match):
        infonce(q, p, pos, backend="chunked", **kwargs)


def test_bad_dtype_and_device():
    q = torch.randn(4, 8)
    with pytest.raises(TypeError, match="same dtype"):
        infonce(q, torch.randn(8, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="floating point"):
        infonce(q.long(), torch.randn(8, 8).long())
    with pytest.raises(ValueError, match="same device"):
        infonce(q, torch.randn(8, 8, device="meta"))
    with pytest.raises(ValueError, match="positive_index is on meta"):
        infonce(q, torch.randn(8, 8), torch.zeros(4, dtype=torch.long, device="meta"))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns (a custom op counts as one op)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("symmetric", [False, True])
def test_never_materialises_similarities(symmetric):
    """Forward and backward around the kernel stay O((B+M)·D): nothing near B×M is built.

    B = 16, M = 1000, D = 3: B×M = 16000 while the inputs and their gradients are ≤ 3000.
    """
    B, M, D = 16, 1000, 3
    q = torch.randn(B, D, requires_grad=True)
    p = torch.randn(M, D, requires_grad=True)
    positives = torch.randint(0, M, (B,))
    with _LargestTensor() as mode:
        infonce(q, p, positives, symmetric=symmetric, backend="cpu").sum().backward()
    assert mode.numel <= M * D < B * M // 4
    with _LargestTensor() as mode:
        infonce_reference(q, p, positives, symmetric=symmetric).sum().backward()
    assert mode.numel >= B * M  # the probe does see a materialised similarity matrix


def test_torch_compile_fullgraph():
    """infonce is plain PyTorch around the linear_logprobs custom op: compile traces it whole."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(6, 8, generator=g, requires_grad=True)
    p = torch.randn(12, 8, generator=g, requires_grad=True)
    positives = torch.tensor([0, 5, 2, 11, 7, 3])

    def loss(q, p):
        return infonce(q, p, positives, symmetric=True, temperature=0.1, backend="cpu")

    # aot_eager: the whole trace (fake tensors, AOT autograd) without inductor codegen time
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    dq, dp = torch.autograd.grad(compiled(q, p).sum(), (q, p))
    expected = infonce_reference(q, p, positives, symmetric=True, temperature=0.1)
    edq, edp = torch.autograd.grad(expected.sum(), (q, p))
    torch.testing.assert_close(compiled(q, p), expected)
    torch.testing.assert_close((dq, dp), (edq, edp))
