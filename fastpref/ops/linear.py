"""``nn.Linear`` on the CPU in float32 through oneDNN, where it is the fused ops' GEMM library.

ATen's fp32 ``F.linear`` is MKL's sgemm, which takes its AVX2 kernels on AMD processors: the
backbone's linear layers ran at 173-180 GFLOP/s in the DPO step on the 2-core Zen 5 we measure
on, where oneDNN's AVX-512 brgemm reaches 373-441 on the same shapes (bench/README.md, the step
breakdown). ``linear`` runs the three GEMMs of a linear layer (forward ``x @ W^T``, backward
``g @ W`` and ``g^T @ x``) through ``torch.ops.fastpref_C.cpu_mm``, the call the fused op's fp32
tiles make (``csrc/include/fastpref/cpu_gemm.h``).

oneDNN builds and caches a primitive (~1 MB) per GEMM shape, and the row count (the flattened
``batch * tokens`` of a packed batch) changes every step: the rows are padded with zero rows up
to a multiple of ``ROW_PAD``, so a run meets a handful of shapes for at most 63 rows of extra
work. The padded rows' outputs are dropped and their gradients are zero, so they add nothing to
``grad_W``. Still full fp32 (no bf16 or tf32 shortcuts): only the summation order differs from
MKL's, a rounding change of a few fp32 ulps per dot product (tests/test_onednn_linear.py).

The layers follow the fused ops' choice of fp32 library (``fastpref._C.cpu_fp32_gemm()``,
``csrc/include/fastpref/cpu_gemm.h``): oneDNN except on Intel processors, where MKL runs its
AVX-512 kernels and is the faster one (routing there made the DPO training step and MiniLM's
fwd+bwd 10% slower: 0.90x / 0.91x, bench/README.md), so nothing is routed unless
``FASTPREF_CPU_GEMM=onednn`` asks for oneDNN. Other dtypes, non-CPU tensors, CPU autocast, a
build without the extension or oneDNN, and ``FASTPREF_LINEAR=aten`` take plain ``F.linear``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastpref.ops import _native

ROW_PAD = 64  # rows are padded to a multiple of this (the bound on oneDNN's primitive cache)

# (padded rows, in features, out features) of every GEMM problem routed so far; a few per layer
# shape over a run, since the padding merges row counts (tests read it).
shapes_seen: set[tuple[int, int, int]] = set()


def onednn_linear_enabled() -> bool:
    """True where the fused ops' fp32 GEMMs run in oneDNN (``FASTPREF_CPU_GEMM``, the CPU's
    vendor); False under ``FASTPREF_LINEAR=aten`` or without the extension or oneDNN."""
    choice = os.environ.get("FASTPREF_LINEAR", "")
    if choice not in ("", "onednn", "aten"):
        raise ValueError(f"FASTPREF_LINEAR must be 'onednn' or 'aten' (or unset), got {choice!r}")
    if choice == "aten" or not _native.native_available():
        return False
    return torch.backends.mkldnn.is_available() and _native._C.cpu_fp32_gemm() == "onednn"


def _padded(x2: Tensor, rows: int) -> Tensor:
    """``x2`` ``[N, D]`` with zero rows appended up to ``rows`` (contiguous); only the
    appended rows are zeroed (a full zero fill of the fresh buffer cost more than the copy)."""
    N = x2.shape[0]
    if rows == N:
        return x2.contiguous()
    out = x2.new_empty(rows, x2.shape[1])
    out[:N].copy_(x2)
    out[N:].zero_()
    return out


def _padded_rows(N: int) -> int:
    return -(-N // ROW_PAD) * ROW_PAD


def _mm(a: Tensor, b: Tensor, rows: int, cols: int) -> Tensor:
    out = a.new_empty(rows, cols)
    torch.ops.fastpref_C.cpu_mm(a, b, out)
    return out


class _OneDNNLinear(torch.autograd.Function):
    """``[Np, D_out]``: the padded rows' outputs too; the caller slices them off outside the
    Function (an autograd view then, so in-place ops on the output are allowed), and the
    incoming gradient arrives zero on them."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        D_out, D_in = weight.shape
        x2 = x.reshape(-1, D_in)  # [N, D_in]
        Np = _padded_rows(x2.shape[0])
        shapes_seen.add((Np, D_in, D_out))
        y = _mm(_padded(x2, Np), weight.t(), Np, D_out)  # [Np, D_out]
        if bias is not None:
            y.add_(bias)
        # x, not its padded copy: q/k/v (and gate/up) share one input, saved once
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        D_out, D_in = weight.shape
        g = grad_y.contiguous()  # [Np, D_out], zero on the padded rows
        Np, N = g.shape[0], x.numel() // D_in
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(g, weight.contiguous(), Np, D_in)[:N].view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = _mm(g.t(), _padded(x.reshape(-1, D_in), Np), D_out, D_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias``, equal to ``F.linear(x, weight, bias)``; on the CPU in float32
    its forward and both backward GEMMs run in oneDNN on rows padded to a multiple of ``ROW_PAD``.

    x: ``[..., D_in]``; weight: ``[D_out, D_in]``; bias: ``[D_out]`` or None.
    """
    if weight.dim() != 2:
        raise ValueError(f"linear: weight must be [D_out, D_in], got {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x {tuple(x.shape)} must end in D_in = {weight.shape[1]} "
            f"(weight {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"linear: bias must be [D_out] = [{weight.shape[0]}], got {tuple(bias.shape)}"
        )
    tensors = (x, weight) if bias is None else (x, weight, bias)
    routed = (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and onednn_linear_enabled()
    )
    if not routed:
        return F.linear(x, weight, bias)
    N = x.numel() // x.shape[-1]
    y = _OneDNNLinear.apply(x, weight, bias)
    if y.shape[0] != N:  # a slice's backward writes the incoming gradient into a zeroed copy
        y = y[:N]
    return y.view(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear``: the same parameters, state_dict names and
    hooks (``use_onednn_linears`` swaps the class of existing layers in place)."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> int:
    """Route every ``nn.Linear`` of ``module`` through ``linear``; returns how many were routed
    (0 where ``onednn_linear_enabled()`` is False: ``FASTPREF_LINEAR=aten``, an Intel processor
    without ``FASTPREF_CPU_GEMM=onednn``, no oneDNN).

    The layers keep their objects, parameters, state_dict keys and hooks (DeepSpeed's ZeRO
    hooks, ``save_pretrained``); only their class becomes ``OneDNNLinear``, a subclass, so
    ``isinstance(layer, nn.Linear)`` still holds and ``copy.deepcopy`` keeps the routing.
    Subclasses of ``nn.Linear`` (their own forward) are left alone.
    """
    if not onednn_linear_enabled():
        return 0
    routed = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = OneDNNLinear
            routed += 1
    return routed
