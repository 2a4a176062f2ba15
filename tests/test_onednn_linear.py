"""fastpref.ops.linear: nn.Linear's three fp32 GEMMs through oneDNN on row-padded inputs.

The bound: oneDNN sums the dot products in another order than MKL, so the outputs differ in
their last bits. Any order of a K-term fp32 dot product (FMA or not) is within
``gamma_K * sum_k |a_k b_k|`` of the exact value, ``gamma_K ~ K * u``, u = 2^-24 (Higham,
Accuracy and Stability of Numerical Algorithms, 3.1): every output and gradient is checked
elementwise against float64 with that bound (K + 1 terms with a bias). The zero rows of the
padding add exact zeros to ``g^T @ x``, so they do not change its bound.

Shapes: the tiny Llama's (32/64 wide) and odd ones (37 or 129 rows: not multiples of 64; 64 and
128: multiples; D_in = 31, D_out = 23: no vector width).

Every test here runs with ``FASTPREF_CPU_GEMM=onednn``: on an Intel processor the default keeps
fp32 on MKL and routes nothing (``test_default_follows_the_cpu_vendor`` checks that choice).
"""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny_llama import assert_same_loss_and_grads, tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

import fastpref.ops.linear as fl
from fastpref.ops import _native
from fastpref.ops.linear import OneDNNLinear, linear, onednn_linear_enabled, use_onednn_linears

U = 2.0**-24


needs_onednn = pytest.mark.skipif(
    not (_native.native_available() and _native._C.cpu_onednn_available()),
    reason="no fastpref._C, or no oneDNN matmul exported by this torch",
)


@pytest.fixture(autouse=True)
def _onednn_gemms(monkeypatch):
    monkeypatch.setenv("FASTPREF_CPU_GEMM", "onednn")


def _cpu_vendor() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@needs_onednn
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo to compare with")
def test_default_follows_the_cpu_vendor(monkeypatch):
    """Unset, fp32 stays with MKL on Intel processors (its AVX-512 kernels beat oneDNN there) and
    goes to oneDNN elsewhere (MKL takes AVX2 on AMD); the linears follow the kernels' choice."""
    monkeypatch.delenv("FASTPREF_CPU_GEMM")
    intel = _cpu_vendor() == "GenuineIntel"
    assert _native._C.cpu_fp32_gemm() == ("mkl" if intel else "onednn")
    assert onednn_linear_enabled() is (not intel)
    assert use_onednn_linears(nn.Sequential(nn.Linear(4, 4))) == (0 if intel else 1)
    monkeypatch.setenv("FASTPREF_CPU_GEMM", "mkl")
    assert not onednn_linear_enabled()
    monkeypatch.setenv("FASTPREF_CPU_GEMM", "onednn")
    assert onednn_linear_enabled()


def _within_bound(got, a, b, exact, K):
    """|got - exact| <= 1.01 * K * u * (|a| @ |b|) elementwise (+ a tiny floor for zeros)."""
    scale = a.abs().double() @ b.abs().double()
    err = (got.double() - exact).abs()
    bound = 1.01 * K * U * scale + 1e-30
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max().item():.3g}"


def _case(shape, D_in, D_out, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D_in, generator=g)
    w = torch.randn(D_out, D_in, generator=g) / D_in**0.5
    b = torch.randn(D_out, generator=g) if bias else None
    gy = torch.randn(*shape, D_out, generator=g)
    return x, w, b, gy


def _run(fn, x, w, b, gy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


@needs_onednn
@pytest.mark.parametrize(
    "shape,D_in,D_out,bias",
    [((37,), 31, 23, True), ((64,), 32, 64, False), ((2, 64), 64, 32, True),
     ((3, 43), 32, 96, False), ((129,), 256, 256, True)],
)  # fmt: skip
def test_outputs_and_grads_within_the_fp32_bound(shape, D_in, D_out, bias):
    x, w, b, gy = _case(shape, D_in, D_out, bias)
    y, gx, gw, gb = _run(linear, x, w, b, gy)
    x2, g2 = x.reshape(-1, D_in).double(), gy.reshape(-1, D_out).double()
    exact_y = x2 @ w.double().T + (b.double() if bias else 0)
    if bias:  # the bias as one more term of each dot product
        xa = torch.cat([x2, torch.ones(len(x2), 1, dtype=torch.float64)], 1)
        wa = torch.cat([w.double(), b.double()[:, None]], 1)
        _within_bound(y.reshape(-1, D_out), xa, wa.T, exact_y, D_in + 1)
    else:
        _within_bound(y.reshape(-1, D_out), x2, w.double().T, exact_y, D_in)
    _within_bound(gx.reshape(-1, D_in), g2, w.double(), g2 @ w.double(), D_out)
    _within_bound(gw, g2.T, x2, g2.T @ x2, len(x2))
    assert y.shape == (*shape, D_out) and gx.shape == x.shape and gw.shape == w.shape
    # against nn.Linear's own fp32 result: the same to fp32 rounding
    ref = _run(F.linear, x, w, b, gy)
    for got, want in zip((y, gx, gw), ref[:3], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(gb, g2.sum(0).float(), rtol=1e-6, atol=1e-5)


@needs_onednn
def test_in_place_on_the_output_and_no_grad():
    x, w, b, gy = _case((37,), 16, 8, True)
    xr = x.clone().requires_grad_()
    y = linear(xr, w, b)
    y.mul_(2)  # a slice of the padded output: an ordinary view, in-place allowed
    y.backward(gy)
    torch.testing.assert_close(xr.grad, 2 * gy @ w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_row_counts_share_a_few_padded_shapes():
    """Packed batches change the row count every step; oneDNN caches a primitive per shape."""
    layer = nn.Linear(32, 48)
    use_onednn_linears(layer)
    fl.shapes_seen.clear()
    counts = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:20] + 1
    for n in counts.tolist():
        x = torch.randn(n, 32, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert x.grad.shape == (n, 32)
    rows = {r for r, _, _ in fl.shapes_seen}
    assert len(counts.unique()) == 20 and len(rows) <= 5 and all(r % 64 == 0 for r in rows)


def test_switch_off_is_exactly_f_linear(monkeypatch):
    monkeypatch.setenv("FASTPREF_LINEAR", "aten")
    x, w, b, gy = _case((2, 37), 31, 23, True)
    fl.shapes_seen.clear()
    for got, want in zip(_run(linear, x, w, b, gy), _run(F.linear, x, w, b, gy), strict=True):
        assert torch.equal(got, want)
    assert not fl.shapes_seen
    assert use_onednn_linears(nn.Sequential(nn.Linear(4, 4))) == 0
    monkeypatch.setenv("FASTPREF_LINEAR", "mkl")
    with pytest.raises(ValueError, match="FASTPREF_LINEAR"):
        linear(x, w, b)


def test_other_dtypes_take_f_linear():
    x, w, b, gy = _case((37,), 16, 8, True)
    fl.shapes_seen.clear()
    args = (x.double(), w.double(), b.double(), gy.double())
    for got, want in zip(_run(linear, *args), _run(F.linear, *args), strict=True):
        assert torch.equal(got, want)
    assert not fl.shapes_seen


def test_shape_errors():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="must end in D_in = 16"):
        linear(torch.randn(3, 15), w)
    with pytest.raises(ValueError, match=r"bias must be \[D_out\] = \[8\]"):
        linear(torch.randn(3, 16), w, torch.randn(7))
    with pytest.raises(ValueError, match="weight must be"):
        linear(torch.randn(3, 16), torch.randn(16))


@needs_onednn
def test_routed_tiny_llama_same_loss_grads_and_state_dict(tmp_path):
    plain = tiny_llama()
    routed = copy.deepcopy(plain)
    n = use_onednn_linears(routed)
    assert n == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the lm_head
    assert all(isinstance(m, nn.Linear) for m in routed.modules() if isinstance(m, OneDNNLinear))
    assert list(routed.state_dict()) == list(plain.state_dict())
    assert_same_loss_and_grads(plain, routed)
    # routing survives a copy (the in-pass reference) and saves as a plain Llama
    assert sum(isinstance(m, OneDNNLinear) for m in copy.deepcopy(routed).modules()) == n
    routed.save_pretrained(tmp_path)
    back = LlamaForCausalLM.from_pretrained(tmp_path)
    assert list(back.state_dict()) == list(plain.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, routed.state_dict()[k]), k
