"""similarity_topk: every backend against the materialising reference, ties, NaN, exclusions,
bad input, registration. (The Triton kernel: tests/test_similarity_topk_triton.py.)

Method: on integer-valued inputs every dot product is an exact float32 integer, so all backends
must return bit for bit the reference's (scores, indices), ties included (the ranking is a total
order: descending score, ascending index, NaN last). On Gaussian inputs the GEMMs round
differently, so there each backend must return a valid top k of the float64 truth: sorted, every
returned score within ``TOL`` of its index's true score, none below the true k-th score - TOL.

Shapes: B=37, D=31, M=203 (no tile size divides any of them; k=203 is the whole corpus, k=1 the
single best); B=600 x M=3000 x D=64 spans two 512-row query blocks, twelve 256-row corpus blocks
of the C++ kernel (the last one partial) and two chunks of the chunked backend; B=3 makes the C++
kernel split the corpus between threads instead of the queries.
"""

from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref.ops.similarity_topk import similarity_topk_reference

BACKENDS = ("reference", "chunked", "cpu")
FUSED = ("chunked", "cpu")
# |score error| allowed, relative to max(1, |true score|): fp32 summation-order noise (16-bit
# inputs are widened exactly; float64 rounds each score to float32 once).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-6}


def integer_inputs(B=37, D=31, M=203, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, D), generator=g).to(dtype)
    c = torch.randint(-2, 3, (M, D), generator=g).to(dtype)
    return q, c


def gaussian_inputs(B=37, D=31, M=203, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g).to(dtype), torch.randn(M, D, generator=g).to(dtype)


def some_exclusions(B, M, seed=0):
    """[B, 4] with -1 padding: row 0 nothing, row 1 everything padded, others 1-4 indices."""
    g = torch.Generator().manual_seed(seed)
    ex = torch.randint(0, M, (B, 4), generator=g)
    ex[0] = -1
    ex[1] = -1
    ex[2:, 2:] = torch.where(torch.rand(B - 2, 2, generator=g) < 0.5, -1, ex[2:, 2:])
    return ex


def assert_valid_topk(got, q, c, k, normalize, exclude=None, tol=1e-5):
    """got is a correct top k of the float64 truth up to near-ties (module docstring)."""
    q, c = q.double(), c.double()
    if normalize:
        q, c = (torch.nn.functional.normalize(x, dim=-1) for x in (q, c))
    truth = q @ c.T
    if exclude is not None:
        rows, cols = (exclude >= 0).nonzero(as_tuple=True)
        truth[rows, exclude[rows, cols]] = float("-inf")
    kth = truth.topk(k, dim=1).values[:, -1:]
    scale = truth.abs().clamp(min=1).max().item()
    assert got.scores.dtype == torch.float32 and got.indices.dtype == torch.int64
    assert got.scores.shape == got.indices.shape == (q.shape[0], k)
    assert (got.scores[:, :-1] >= got.scores[:, 1:]).all(), "scores not descending"
    assert all(len(set(row.tolist())) == k for row in got.indices), "repeated index"
    picked = truth.gather(1, got.indices)
    assert ((picked - got.scores.double()).abs() <= tol * scale).all(), "score of wrong index"
    assert (picked >= kth - tol * scale).all(), "an index below the true k-th score"


# --- exact agreement, ties ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 203])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_integer_inputs_match_the_reference_bit_for_bit(backend, dtype, k, with_exclude):
    q, c = integer_inputs(dtype=dtype)
    ex = some_exclusions(37, 203) if with_exclude else None
    want = similarity_topk_reference(q, c, k, exclude=ex)
    got = fastpref.similarity_topk(q, c, k, exclude=ex, backend=backend)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.scores, want.scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_ties_go_to_the_smaller_index(backend):
    """q = [1, 0]; C rows [0, 1], [1, 0], [1, 0], [2, 0], [-1, 0] score 0, 1, 1, 2, -1.
    Top 4: index 3 (2), then the tie 1 before 2 (1, 1), then index 0 (0)."""
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    got = fastpref.similarity_topk(q, c, 4, backend=backend)
    assert got.indices.tolist() == [[3, 1, 2, 0]]
    assert got.scores.tolist() == [[2.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_corpus_rows_come_out_in_index_order(backend):
    q, c = integer_inputs(B=5, M=60)
    c = torch.cat([c, c, c])  # row j == j + 60 == j + 120
    got = fastpref.similarity_topk(q, c, 30, backend=backend)
    for row_s, row_i in zip(got.scores.tolist(), got.indices.tolist(), strict=True):
        for a in range(29):  # equal scores: ascending index; and each copy appears in order
            assert row_s[a] > row_s[a + 1] or row_i[a] < row_i[a + 1]
    want = similarity_topk_reference(q, c, 30)
    assert torch.equal(got.indices, want.indices)


def test_negative_zero_ties_with_zero():
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[-0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])  # scores -0, 0, -1
    for backend in BACKENDS:
        assert fastpref.similarity_topk(q, c, 2, backend=backend).indices.tolist() == [[0, 1]]


# --- Gaussian inputs: a valid top k ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [1, 5, 203])
def test_gaussian_inputs_give_a_valid_topk(backend, dtype, normalize, k):
    q, c = gaussian_inputs(dtype=dtype)
    ex = some_exclusions(37, 203)
    got = fastpref.similarity_topk(q, c, k, exclude=ex, normalize=normalize, backend=backend)
    if k == 203:  # fewer than k candidates left where rows exclude something: padded
        n_ex = torch.tensor([len(set(r.tolist()) - {-1}) for r in ex])
        pad = torch.arange(k)[None, :] >= (203 - n_ex)[:, None]
        assert torch.equal(got.indices == -1, pad)
        assert (got.scores[pad] == float("-inf")).all()
        got = type(got)(got.scores[:, :150], got.indices[:, :150])
        k = 150
    assert_valid_topk(got, q, c, k, normalize, ex, TOL[dtype])
    assert not (got.indices[:, :, None] == ex[:, None, :]).any(), "an excluded index came back"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("normalize", [False, True])
def test_many_tiles_and_chunks(backend, normalize):
    q, c = gaussian_inputs(B=600, D=64, M=3000, seed=1)
    ex = some_exclusions(600, 3000)
    got = fastpref.similarity_topk(q, c, 10, exclude=ex, normalize=normalize, backend=backend)
    assert_valid_topk(got, q, c, 10, normalize, ex)


@pytest.mark.parametrize("B", [3, 600])
def test_cpu_kernel_is_independent_of_the_thread_count(B):
    q, c = gaussian_inputs(B=B, D=64, M=3000, seed=2)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(fastpref.similarity_topk(q, c, 7, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        assert torch.equal(r.indices, runs[0].indices) and torch.equal(r.scores, runs[0].scores)


# --- non-finite inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_sorts_after_every_number(backend):
    q, c = integer_inputs(B=4, M=20)
    c[3, 0] = float("nan")  # column 3 is NaN for every query
    c[5, 0] = float("-inf")  # column 5 is +-inf or NaN (inf * 0)
    q[2, 0] = 0.0
    q[1, 4] = float("nan")  # query 1: every score NaN
    got = fastpref.similarity_topk(q, c, 20, backend=backend)
    want = similarity_topk_reference(q, c, 20)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.scores.isnan(), want.scores.isnan())
    finite = ~want.scores.isnan()
    assert torch.equal(got.scores[finite], want.scores[finite])
    assert got.indices[1].tolist() == list(range(20)) and got.scores[1].isnan().all()
    for row in (0, 3):  # NaN column last; the -inf one just before it
        assert got.indices[row, -1] == 3 and got.indices[row, -2] == 5


# --- exclusions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_padding_only_exclusions_change_nothing(backend):
    q, c = integer_inputs()
    want = fastpref.similarity_topk(q, c, 5, backend=backend)
    for ex in (torch.empty(37, 0, dtype=torch.long), torch.full((37, 3), -1)):
        got = fastpref.similarity_topk(q, c, 5, exclude=ex, backend=backend)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_excluding_too_many_pads_with_minus_one(backend):
    q, c = integer_inputs(B=3, M=10)
    ex = torch.tensor([list(range(10)), [0, 1, 2, 3, 4, 5, 6, 6, 6, -1], [9] * 10])
    got = fastpref.similarity_topk(q, c, 5, exclude=ex.int(), backend=backend)  # int32 is fine
    assert got.indices[0].tolist() == [-1] * 5 and (got.scores[0] == float("-inf")).all()
    assert (
        sorted(got.indices[1, :3].tolist()) == [7, 8, 9] and got.indices[1, 3:].tolist() == [-1] * 2
    )
    assert 9 not in got.indices[2].tolist() and (got.indices[2] >= 0).all()
    want = similarity_topk_reference(q, c, 5, exclude=ex)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(k=204), ValueError, r"k=204 is more than the corpus has \(M=203 rows\)"),
        (dict(k=0), ValueError, r"k must be >= 1, got k=0"),
        (dict(k=2.0), TypeError, r"k must be an int"),
        (dict(k=True), TypeError, r"k must be an int"),
        (
            dict(corpus=torch.zeros(203, 30)),
            ValueError,
            r"queries \(37, 31\) and corpus \(203, 30\)",
        ),
        (
            dict(corpus=torch.zeros(203, 31).double()),
            TypeError,
            r"queries torch.float32 and corpus",
        ),
        (dict(queries=torch.zeros(31)), ValueError, r"queries must be a 2-D tensor, got \(31,\)"),
        (dict(corpus=torch.zeros(203, 31, device="meta")), ValueError, r"corpus is on meta"),
        (
            dict(exclude=torch.zeros(36, 2).long()),
            ValueError,
            r"exclude must be \[B, P\] = \[37, P\]",
        ),
        (dict(exclude=torch.zeros(37, 2)), TypeError, r"exclude must be an integer tensor"),
        (dict(exclude="x"), ValueError, r"exclude must be \[B, P\]"),
    ],
)
def test_bad_arguments_are_named(backend, change, error, match):
    q, c = integer_inputs()
    args = dict(queries=q, corpus=c, k=5, exclude=None) | change
    with pytest.raises(error, match=match):
        fastpref.similarity_topk(
            args["queries"], args["corpus"], args["k"], exclude=args["exclude"], backend=backend
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [203, -2, 10**12])
def test_out_of_range_exclusion_names_its_position(backend, bad):
    q, c = integer_inputs()
    ex = torch.full((37, 3), -1)
    ex[4, 1] = bad
    ex[5, 0] = 500  # only the first bad position is named
    with pytest.raises(ValueError, match=rf"exclude\[4, 1\] = {bad} is outside \[0, M=203\)"):
        fastpref.similarity_topk(q, c, 5, exclude=ex, backend=backend)


def test_raw_cpu_kernel_checks_shapes_and_never_matches_a_stray_exclusion():
    q, c = integer_inputs()
    with pytest.raises(RuntimeError, match=r"k must be in \[1, M\] = \[1, 203\], got 204"):
        torch.ops.fastpref_C.similarity_topk(q, c, 204, None, False)
    with pytest.raises(RuntimeError, match=r"exclude must be int64 \[B, P\] = \[37, P\]"):
        torch.ops.fastpref_C.similarity_topk(q, c, 5, torch.zeros(37, 1, dtype=torch.int32), False)
    # past the ops layer nothing scans the values: a stray one is compared, never dereferenced
    stray = torch.full((37, 2), 10**12)
    stray[:, 1] = -(10**12)
    got = torch.ops.fastpref_C.similarity_topk(q, c, 5, stray, False)
    want = similarity_topk_reference(q, c, 5)
    assert torch.equal(got[1], want.indices)


# --- the public surface ---------------------------------------------------------------------------


def test_exported_and_returns_a_named_pair_without_gradient():
    assert "similarity_topk" in fastpref.__all__ and "similarity_topk" in fastpref.ops.__all__
    q, c = gaussian_inputs()
    q.requires_grad_(True)
    scores, indices = fastpref.similarity_topk(q, c, 3)
    assert not scores.requires_grad and indices.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_queries(backend):
    got = fastpref.similarity_topk(torch.zeros(0, 31), torch.randn(203, 31), 4, backend=backend)
    assert got.scores.shape == got.indices.shape == (0, 4)


def test_env_var_forces_a_backend(monkeypatch):
    mod = __import__("fastpref.ops.similarity_topk", fromlist=["_IMPLS"])
    calls = []
    real = mod._IMPLS["chunked"]
    monkeypatch.setitem(mod._IMPLS, "chunked", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("FASTPREF_BACKEND", "chunked")
    q, c = integer_inputs()
    fastpref.similarity_topk(q, c, 5)
    assert calls == [1]


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    q, c = gaussian_inputs(B=7, D=5, M=13)
    ex = torch.tensor([[1, -1]] * 7)
    op = torch.ops.fastpref.similarity_topk
    torch.library.opcheck(op, (q, c, 4, ex, True, backend))
    torch.library.opcheck(op, (q, c, 13, None, False, backend))


def test_torch_compile_fullgraph_traces_the_op():
    q, c = gaussian_inputs()
    ex = some_exclusions(37, 203)

    def fn(q, c):
        return fastpref.similarity_topk(q, c, 5, exclude=ex, normalize=True, backend="cpu")

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, c)
    want = fn(q, c)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)
