"""linear_logprobs: bad input, empty and degenerate input, registration (opcheck, torch.compile),
backend selection and fallback, and the Triton kernels under the interpreter."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastpref
from fastpref.ops import _dispatch, _native
from fastpref.ops.linear_logprobs import linear_logprobs_reference

BACKENDS = ("reference", "chunked", "cpu")


def small(N=6, D=4, V=9, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, t


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [9, -1, 1000])
def test_out_of_range_target_names_position_and_value(backend, bad):
    h, w, t = small()
    t[4] = bad
    t[5] = bad + 1 if bad != -1 else -2  # only the first bad position is named
    with pytest.raises(ValueError, match=rf"targets\[4\] = {bad} is outside \[0, 9\)"):
        fastpref.linear_logprobs(h, w, t, backend=backend)


def test_sequence_logprobs_names_batch_and_time_of_a_bad_label():
    h, w, t = small(N=6)
    labels = t.view(2, 3).clone()
    labels[1, 2] = 50
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 50 is outside \[0, 9\)"):
        fastpref.sequence_logprobs(h.view(2, 3, 4), w, labels)


@pytest.mark.parametrize(
    "case, match",
    [
        ("d_mismatch", r"hidden \(6, 4\) and weight \(9, 5\)"),
        ("targets_len", r"targets \(5,\)"),
        ("bias_len", r"bias \(8,\)"),
        ("hidden_3d", r"hidden \(2, 3, 4\)"),
    ],
)
def test_shape_errors_name_both_shapes(case, match):
    h, w, t = small()
    b = None
    if case == "d_mismatch":
        w = torch.randn(9, 5)
    elif case == "targets_len":
        t = t[:5]
    elif case == "bias_len":
        b = torch.randn(8)
    elif case == "hidden_3d":
        h = h.view(2, 3, 4)
    with pytest.raises(ValueError, match=match):
        fastpref.linear_logprobs(h, w, t, b)


def test_dtype_and_device_errors_name_both():
    h, w, t = small()
    with pytest.raises(TypeError, match=r"hidden torch.float32 and weight torch.bfloat16"):
        fastpref.linear_logprobs(h, w.bfloat16(), t)
    with pytest.raises(TypeError, match=r"targets must be int64 or int32; got torch.float32"):
        fastpref.linear_logprobs(h, w, t.float())
    with pytest.raises(ValueError, match=r"hidden is on cpu but weight is on meta"):
        fastpref.linear_logprobs(h, w.to("meta"), t)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        fastpref.linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"softcap must be > 0"):
        fastpref.linear_logprobs(h, w, t, softcap=-1.0)


def test_cpp_kernel_checks_its_own_arguments():
    """The raw kernel never reads out of bounds even when called past the ops layer."""
    h, w, t = small()
    t[2] = 9
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 9 is outside \[0, 9\)"):
        torch.ops.fastpref_C.linear_logprobs_fwd(h, w, t, None, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"bias must be \[V\] = \[9\]"):
        torch.ops.fastpref_C.linear_logprobs_fwd(
            h, w, t.clamp(max=8), torch.zeros(3), 1.0, 0.0, False
        )


# --- degenerate input ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["n0", "all_ignored"])
def test_empty_and_all_ignored_give_zeros_with_zero_grads(backend, case):
    N = 0 if case == "n0" else 5
    h = torch.randn(N, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    t = torch.full((N,), -100)
    out = fastpref.linear_logprobs(h, w, t, b, backend=backend)
    ent = fastpref.linear_entropy(h, w, t, b, backend=backend)
    assert out.shape == (N,) and (out == 0).all() and (ent == 0).all()
    (out.sum() + ent.sum()).backward()
    for x in (h, w, b):
        assert x.grad is not None and (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    h, w, t = small(N=10, D=8, V=30)
    h_nc = torch.randn(8, 10).T  # [10, 8] with stride (1, 10)
    h_nc.copy_(h)
    w_nc = torch.randn(30, 16)[:, ::2]
    w_nc.copy_(w)
    t_nc = torch.stack([t, t], 1)[:, 0]
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or t_nc.is_contiguous())
    torch.testing.assert_close(
        fastpref.linear_logprobs(h_nc, w_nc, t_nc, backend=backend),
        linear_logprobs_reference(h, w, t),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_row_poisons_that_row_only(backend, poison):
    h, w, t = small(N=6, D=4, V=300)
    clean = fastpref.linear_logprobs(h, w, t, backend=backend)
    h[2, 1] = poison
    out = fastpref.linear_logprobs(h, w, t, backend=backend)
    assert torch.isnan(out[2])
    keep = torch.arange(6) != 2
    torch.testing.assert_close(out[keep], clean[keep])


def test_wide_logits_stay_finite_and_exact():
    """Logit std ~20: most probabilities underflow; lse and log p must still be exact."""
    h, w, t = small(N=64, D=16, V=1000, dtype=torch.float64)
    h = h * 20 / 4  # z = h . w has std ~ 20
    ref = linear_logprobs_reference(h, w, t)
    for backend in ("chunked", "cpu"):
        got = fastpref.linear_logprobs(h.float(), w.float(), t, backend=backend)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, atol=2e-3, rtol=1e-5)


# --- registration ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ("chunked", "cpu"))
def test_opcheck(backend):
    h, w, t = small(N=7, D=5, V=13)
    t[1] = -100
    b = torch.randn(13)
    fwd, bwd = torch.ops.fastpref.linear_logprobs_fwd, torch.ops.fastpref.linear_logprobs_bwd
    torch.library.opcheck(fwd, (h, w, t, b, -100, 0.5, 3.0, True, backend))
    torch.library.opcheck(fwd, (h, w, t, None, -100, 1.0, None, False, backend))
    torch.library.opcheck(fwd, (h, w, t, b, -100, 0.5, 3.0, True, backend, True, 2**30))
    _, lse, ent, _ = fwd(h, w, t, b, -100, 0.5, 3.0, True, backend)
    _, _, _, kept = fwd(h, w, t, b, -100, 0.5, 3.0, True, backend, True, 2**30)
    assert kept.numel() == (64 * 13 if backend == "cpu" else 0)  # 6 kept rows padded to 64
    g = torch.randn(7)
    torch.library.opcheck(
        bwd, (g, g, h, w, t, b, lse, ent, -100, 0.5, 3.0, True, True, True, backend)
    )
    torch.library.opcheck(
        bwd, (g, None, h, w, t, None, lse, None, -100, 1.0, None, True, False, False, backend)
    )
    torch.library.opcheck(
        bwd, (g, g, h, w, t, b, lse, ent, -100, 0.5, 3.0, True, True, True, backend, kept)
    )


def test_torch_compile_fullgraph_traces_the_ops():
    h, w, t = small(N=6, D=8, V=21)
    t[2] = -100
    h.requires_grad_()
    w.requires_grad_()
    b = torch.randn(21, requires_grad=True)

    def loss(h, w, b):
        logp = fastpref.linear_logprobs(h, w, t, b, softcap=3.0, backend="cpu")
        ent = fastpref.linear_entropy(h, w, t, b)
        seq = fastpref.sequence_logprobs(h.view(2, 3, 8), w, t.view(2, 3), average=True)
        return logp.sum() + 0.1 * ent.sum() + seq.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(h, w, b), (h, w, b))
    want = torch.autograd.grad(loss(h, w, b), (h, w, b))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y)


# --- backend selection -----------------------------------------------------------------------


def test_env_var_forces_a_backend(monkeypatch):
    calls = []
    mod = importlib.import_module("fastpref.ops.linear_logprobs")  # the attribute is the function
    real = mod._IMPLS["chunked"]
    monkeypatch.setitem(mod._IMPLS, "chunked", (lambda *a: calls.append(1) or real[0](*a), real[1]))
    monkeypatch.setenv("FASTPREF_BACKEND", "chunked")
    h, w, t = small()
    fastpref.linear_logprobs(h, w, t)
    assert calls == [1]


def test_missing_native_build_falls_back_to_chunked_with_one_warning(monkeypatch):
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "native_available", lambda: False)
    monkeypatch.setattr(_dispatch, "NATIVE_ERROR", "fastpref._C could not be imported (test)")
    monkeypatch.setattr(_native, "_warned", set())
    h, w, t = small()
    with pytest.warns(RuntimeWarning, match=r"falling back to the chunked.*could not be imported"):
        out = fastpref.linear_logprobs(h, w, t)
    torch.testing.assert_close(out, linear_logprobs_reference(h, w, t))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpref.linear_logprobs(h, w, t)  # one warning per process, not per call


def test_explicit_backend_that_is_not_built_is_an_error(monkeypatch):
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "native_available", lambda: False)
    monkeypatch.setattr(_dispatch, "NATIVE_ERROR", "fastpref._C could not be imported (test)")
    h, w, t = small()
    want = r"backend='cpu' is not available: .*could not be imported"
    with pytest.raises(RuntimeError, match=want):
        fastpref.linear_logprobs(h, w, t, backend="cpu")


def _fwd_bwd_cpu(h, w, t, b):
    """logp and entropy of the C++ kernel and the gradients of a mix of both."""
    h, w, b = (x.detach().clone().requires_grad_(True) for x in (h, w, b))
    logp = fastpref.linear_logprobs(h, w, t, b, softcap=30.0, backend="cpu")
    ent = fastpref.linear_entropy(h, w, t, b, softcap=30.0, backend="cpu")
    (logp.sum() + 0.3 * ent.sum()).backward()
    return [logp, ent, h.grad, w.grad, b.grad]


@pytest.mark.parametrize(
    ("N", "dtype"),
    # 37 and 600 rows: a padded last row block alone and after a full 512-row fp32 block;
    # 1100: after a full 1024-row bf16 block
    [(37, torch.float32), (600, torch.float32), (1100, torch.bfloat16)],
)
def test_cpu_gemm_libraries_agree(N, dtype, monkeypatch):
    """The fp32 tile GEMMs run in oneDNN (rows padded to a multiple of 64) or, with
    FASTPREF_CPU_GEMM=mkl, in ATen's mm: both give the same values and gradients, and the
    oneDNN path is reproducible bit for bit. (bf16 goes to oneDNN through ATen either way: its
    case checks the padded 1100-row run against itself; test_linear_logprobs checks its values.)
    oneDNN is asked for by name: unset, Intel processors keep fp32 on MKL."""
    h, w, t = small(N=N, D=48, V=203, seed=1)
    b = torch.randn(203, generator=torch.Generator().manual_seed(2))
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    t[::5] = -100
    monkeypatch.setenv("FASTPREF_CPU_GEMM", "onednn")
    if not _native._C.cpu_onednn_available():  # torch 2.13 (CI's pin) does export it
        pytest.skip("this torch exports no at::native::mkldnn_matmul: fp32 stays on ATen's mm")
    ours = _fwd_bwd_cpu(h, w, t, b)
    assert all(torch.equal(x, y) for x, y in zip(ours, _fwd_bwd_cpu(h, w, t, b), strict=True))
    monkeypatch.setenv("FASTPREF_CPU_GEMM", "mkl")
    assert _native._C.cpu_fp32_gemm() == "mkl"
    mkl = _fwd_bwd_cpu(h, w, t, b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for x, y in zip(ours, mkl, strict=True):
        torch.testing.assert_close(x.float(), y.float(), **tol)


@pytest.mark.parametrize("value", ["MKL", "blas", " mkl"])
def test_cpu_gemm_env_var_rejects_unknown_values(value, monkeypatch):
    monkeypatch.setenv("FASTPREF_CPU_GEMM", value)
    h, w, t = small()
    with pytest.raises(RuntimeError, match=r"FASTPREF_CPU_GEMM must be 'onednn' or 'mkl'"):
        fastpref.linear_logprobs(h, w, t, backend="cpu")
    monkeypatch.setenv("FASTPREF_CPU_GEMM", "mkl")  # a valid value runs
    torch.testing.assert_close(
        fastpref.linear_logprobs(h, w, t, backend="cpu"), linear_logprobs_reference(h, w, t)
    )


_SHAPE_CACHE_CHECK = textwrap.dedent(
    """
    import ctypes, gc, sys, torch, fastpref
    libc = ctypes.CDLL("libc.so.6")
    def rss_mb():
        gc.collect(); libc.malloc_trim(0)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    D, V = 64, 4096
    W = torch.randn(V, D, requires_grad=True)
    def step(N):
        h = torch.randn(N, D, requires_grad=True)
        fastpref.linear_logprobs(h, W, torch.randint(0, V, (N,)), backend="cpu").sum().backward()
        W.grad = None
    step(321)
    base = rss_mb()
    for N in range(322, 362):  # 40 row counts, one padded row count (384)
        step(N)
    print("growth_mb", rss_mb() - base)
    """
)


def test_forty_batch_sizes_leave_no_trail_of_gemm_state():
    """oneDNN caches ~1 MB of primitive per GEMM shape: the kernel pads the last row block to 64
    rows so that 40 row counts in one 64-row band reuse one set of shapes. Unpadded, this run
    grew the resident set by 93 MB, padded by under 1 MB (fresh process, freed memory trimmed)."""
    if not _native._C.cpu_onednn_available():
        pytest.skip("this torch exports no at::native::mkldnn_matmul: fp32 stays on ATen's mm")
    proc = subprocess.run(
        [sys.executable, "-c", _SHAPE_CACHE_CHECK],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FASTPREF_CPU_GEMM": "onednn"},  # unset, Intel keeps fp32 on MKL
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = float(proc.stdout.split("growth_mb")[1])
    assert growth < 8, f"resident set grew by {growth:.1f} MB over 40 batch sizes"


def test_unknown_backend_is_an_error():
    h, w, t = small()
    with pytest.raises(ValueError, match="cuda"):
        fastpref.linear_logprobs(h, w, t, backend="cuda")


# --- Triton kernels under the interpreter ----------------------------------------------------

_TRITON_CHECK = textwrap.dedent(
    """
    import torch, fastpref
    from fastpref.ops.linear_logprobs import linear_logprobs_reference
    torch.manual_seed(0)
    N, D, V = 7, 16, 37
    TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
    for dtype in (torch.float32, torch.bfloat16):
        for kw in ({}, dict(temperature=0.5, softcap=3.0)):
            x = [torch.randn(N, D, dtype=torch.float64), torch.randn(V, D, dtype=torch.float64) / 4,
                 torch.randn(V, dtype=torch.float64)]
            t = torch.randint(0, V, (N,)); t[2] = -100
            up = torch.randn(N, dtype=torch.float64)
            def run(fn, dt, **more):
                ins = [a.to(dt).requires_grad_() for a in x]
                out = fn(*ins[:2], t, ins[2], **kw, **more)
                return [out, *torch.autograd.grad((out * up.to(out.dtype)).sum(), ins)]
            truth = run(linear_logprobs_reference, torch.float64)
            ref = run(linear_logprobs_reference, dtype)
            got = run(fastpref.linear_logprobs, dtype, backend="triton")
            for g, r, tr in zip(got, ref, truth):
                s = max(tr.abs().max().item(), 1.0)
                err = (g.double() - tr).abs().max().item() / s
                ref_err = (r.double() - tr).abs().max().item() / s
                assert err <= ref_err + TOL[dtype], (dtype, kw, err, ref_err)
    print("triton-ok")
    """
)


def test_triton_backend_under_interpreter():
    """The ops layer drives fastpref.kernels.linear_logprobs (fwd and bwd launchers) on CPU
    tensors. TRITON_INTERPRET is read when triton is imported, hence the fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FASTPREF_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "triton-ok" in proc.stdout, proc.stderr[-3000:]
