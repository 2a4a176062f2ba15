"""fastpref.ops.decoder: RMSNorm and SwiGLU in one native pass each, forward and backward.

The bound for fp32: the native kernels sum the mean of squares and the backward's row dot
product in another order than ATen, so results differ from float64 by a few fp32 ulps of the
terms summed (Higham 3.1: ``K · 2^-24 · Σ|terms|`` for a K-term sum) plus one rounding per
elementwise product; the checks use a relative 1e-5 on D = 37..256 (the sums' error ~D · 6e-8).
bf16: the forward matches transformers' formula (the same two roundings) to one bf16 ulp.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _tiny_llama import assert_same_loss_and_grads, tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

import fastpref.ops.decoder as fd
from fastpref.ops import _native
from fastpref.ops.decoder import rms_norm, swiglu, use_fused_decoder_ops

needs_native = pytest.mark.skipif(not _native.native_available(), reason="no fastpref._C built")


def _rms_norm_f64(x, w, eps):
    h = x.double()
    return w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@needs_native
def test_hand_derived_values():
    # x = [3, 4]: mean(x²) = 12.5, r = 1 / sqrt(12.5); w = [1, 2] -> y = [3 r, 8 r]
    r = 1 / math.sqrt(12.5)
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    y = rms_norm(x, w, 0.0)
    torch.testing.assert_close(y, torch.tensor([[3 * r, 8 * r]]), rtol=1e-6, atol=0)
    # d(y0 + y1)/dx with xhat = x r: gx = w = [1, 2], c = mean(gx xhat) = (3 + 8) r / 2,
    # dx = r (gx - xhat c); dw = xhat
    y.sum().backward()
    c = 11 * r / 2
    torch.testing.assert_close(
        x.grad, torch.tensor([[r * (1 - 3 * r * c), r * (2 - 4 * r * c)]]), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(w.grad, torch.tensor([3 * r, 4 * r]), rtol=1e-6, atol=0)
    # silu(1) = 1 / (1 + e^-1) = 0.7310586; times up = 2; silu(0) = 0. gate_up = [gate | up]
    s = 1 / (1 + math.exp(-1))
    gu = torch.tensor([[1.0, 0.0, 2.0, 5.0]], requires_grad=True)
    h = swiglu(gu)
    torch.testing.assert_close(h, torch.tensor([[2 * s, 0.0]]), rtol=1e-6, atol=0)
    h.sum().backward()
    # dh/dgate = up s (1 + a (1 - s)); at a = 0: up / 2. dh/dup = silu(a)
    torch.testing.assert_close(
        gu.grad, torch.tensor([[2 * s * (1 + (1 - s)), 2.5, s, 0.0]]), rtol=1e-6, atol=0
    )


@needs_native
@pytest.mark.parametrize("shape", [(5, 37), (129, 64), (3, 7, 256)])
def test_rms_norm_float32_against_float64(shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).requires_grad_()
    g = torch.randn(*shape, generator=gen)
    rms_norm(x, w, 1e-6).backward(g)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = _rms_norm_f64(x64, w64, 1e-6)
    y64.backward(g.double())
    torch.testing.assert_close(rms_norm(x, w, 1e-6).double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)


@needs_native
def test_swiglu_float32_against_float64_including_saturated_gates():
    gen = torch.Generator().manual_seed(2)
    gate = torch.randn(3, 11, 300, generator=gen) * 4
    gate[0, 0, :4] = torch.tensor([-100.0, -80.5, 90.0, 1e4])  # the exp clamp's range and beyond
    gu = torch.cat([gate, torch.randn(3, 11, 300, generator=gen)], -1).requires_grad_()
    g = torch.randn(3, 11, 300, generator=gen)
    h = swiglu(gu)
    h.backward(g)
    gu64 = gu.detach().double().requires_grad_()
    a64, b64 = gu64.chunk(2, -1)
    h64 = F.silu(a64) * b64
    h64.backward(g.double())
    assert h.shape == (3, 11, 300)
    assert torch.isfinite(h).all() and torch.isfinite(gu.grad).all()
    torch.testing.assert_close(h.double(), h64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gu.grad.double(), gu64.grad, rtol=1e-5, atol=1e-6)


@needs_native
def test_bfloat16_forward_rounds_as_transformers_does():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 96, generator=gen).bfloat16()
    w = (1 + 0.1 * torch.randn(96, generator=gen)).bfloat16()
    ref = fd._rms_norm_aten(x, w, 1e-6)  # LlamaRMSNorm's own lines
    got = rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    ulp = 2.0**-7 * ref.float().abs()  # one bf16 ulp (8 significant bits) of each value
    assert ((got.float() - ref.float()).abs() <= ulp).all()
    gu = torch.randn(64, 192, generator=gen).bfloat16()
    a, b = gu.chunk(2, -1)
    ref = F.silu(a) * b
    got = swiglu(gu)
    assert ((got.float() - ref.float()).abs() <= 2.0**-7 * ref.float().abs()).all()
    # the gradients are fp32 inside, rounded once: within a bf16 ulp of fp32's
    gu.requires_grad_()
    swiglu(gu).sum().backward()
    gu32 = gu.detach().float().requires_grad_()
    a32, b32 = gu32.chunk(2, -1)
    (F.silu(a32) * b32).sum().backward()
    assert ((gu.grad.float() - gu32.grad).abs() <= 2.0**-7 * gu32.grad.abs() + 1e-30).all()


@needs_native
def test_weight_gradient_is_deterministic():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(301, 64, generator=gen).requires_grad_()
    w = torch.randn(64, generator=gen).requires_grad_()
    g = torch.randn(301, 64, generator=gen)
    grads = []
    for _ in range(3):
        w.grad = None
        rms_norm(x, w, 1e-5).backward(g)
        grads.append(w.grad.clone())
    assert all(torch.equal(grads[0], d) for d in grads[1:])


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"rms_norm: x \(4, 5\) must end in D"):
        rms_norm(torch.zeros(4, 5), torch.ones(6))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(torch.zeros(4, 5), torch.ones(5), -1.0)
    with pytest.raises(ValueError, match=r"swiglu: gate_up must be .* got \(2, 3\)"):
        swiglu(torch.zeros(2, 3))


@needs_native
def test_kernels_check_shapes_and_dtypes_before_touching_memory():
    op = torch.ops.fastpref_C
    with pytest.raises(RuntimeError, match=r"weight must be \[D\] = \[5\]"):
        op.rms_norm_fwd(torch.zeros(4, 5), torch.ones(6), 1e-6)
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16"):
        op.rms_norm_fwd(torch.zeros(4, 5, dtype=torch.float64), torch.ones(5).double(), 1e-6)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op.swiglu_fwd(torch.zeros(4, 12)[:, ::2])
    with pytest.raises(RuntimeError, match=r"gate_up must be \[N, 2 I\]"):
        op.swiglu_fwd(torch.zeros(4, 5))
    with pytest.raises(RuntimeError, match=r"rstd must be contiguous float32 \[N\] = \[4\]"):
        op.rms_norm_bwd(torch.zeros(4, 5), torch.zeros(4, 5), torch.ones(5), torch.ones(3))
    with pytest.raises(RuntimeError, match=r"grad must be \[N, I\] = \[4, 3\]"):
        op.swiglu_bwd(torch.zeros(4, 5), torch.zeros(4, 6))


def test_other_dtypes_and_the_switch_take_the_aten_formula(monkeypatch):
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.ones(8, dtype=torch.float64)
    y = rms_norm(x, w, 1e-6)  # LlamaRMSNorm's lines, fp32 inside as there
    assert "_RMSNorm" not in type(y.grad_fn).__name__
    assert torch.equal(y, fd._rms_norm_aten(x, w, 1e-6))
    monkeypatch.setenv("FASTPREF_DECODER_OPS", "aten")
    assert use_fused_decoder_ops(tiny_llama()) == 0
    assert rms_norm(torch.ones(2, 3), torch.ones(3)).grad_fn is None
    monkeypatch.setenv("FASTPREF_DECODER_OPS", "fast")
    with pytest.raises(ValueError, match="FASTPREF_DECODER_OPS must be 'native' or 'aten'"):
        fd.decoder_ops_enabled()


@needs_native
def test_swapped_tiny_llama_same_loss_grads_and_state_dict(tmp_path, monkeypatch):
    plain = tiny_llama()
    fused = copy.deepcopy(plain)
    n = use_fused_decoder_ops(fused)
    assert n == 2 * 3 + 1  # two norms and the MLP per layer, and the final norm
    assert use_fused_decoder_ops(fused) == 0  # already swapped
    norms = [m for m in fused.modules() if isinstance(m, fd.FusedRMSNorm)]
    assert len(norms) == 5 and all(type(m).__name__ == "LlamaRMSNorm" for m in norms)
    assert list(fused.state_dict()) == list(plain.state_dict())
    ids = assert_same_loss_and_grads(plain, fused)
    assert sum(isinstance(m, fd.FusedRMSNorm) for m in copy.deepcopy(fused).modules()) == 5
    with torch.no_grad():  # the switch, read at every call, gives back transformers' forward
        monkeypatch.setenv("FASTPREF_DECODER_OPS", "aten")
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        monkeypatch.delenv("FASTPREF_DECODER_OPS")
    fused.save_pretrained(tmp_path)
    back = LlamaForCausalLM.from_pretrained(tmp_path)
    for k, v in back.state_dict().items():
        assert torch.equal(v, fused.state_dict()[k]), k


def test_unmatched_modules_are_left_alone():
    class GemmaLikeRMSNorm(nn.Module):  # (1 + w): another formula, not in the allowlist
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

    model = nn.Sequential(GemmaLikeRMSNorm(), nn.Linear(4, 4))
    assert use_fused_decoder_ops(model) == 0
    assert type(model[0]) is GemmaLikeRMSNorm
