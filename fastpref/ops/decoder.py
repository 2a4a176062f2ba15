"""A decoder layer's RMSNorm and SwiGLU on the CPU in one native pass each, forward and backward.

transformers' ``LlamaRMSNorm`` is five ATen ops (``pow``, ``mean``, ``rsqrt``, two ``mul``) whose
autograd backward is about nine more passes over ``[tokens, hidden]``, and ``LlamaMLP``'s
``act_fn(gate) * up`` is two ops plus three in the backward, after two GEMMs over the same
input. On the 2-core Zen 4 VM a tiny Llama's DPO step spent ~0.09 s a step on these rows against
~0.26 s in the backbone's GEMMs (bench/README, the step breakdown); here each is one pass
(``csrc/cpu/decoder.cpp``, arithmetic in ``csrc/include/fastpref/decoder_math.h``).

- RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), as Llama, Mistral and
  Qwen2/3 write it: ``y = w * (x / sqrt(mean(x²) + eps))`` computed in fp32; for bf16 the
  normalised ``x`` is rounded to bf16 before the product, as ``weight * hidden.to(bf16)`` does.
  Gemma's ``(1 + w)`` variant is a different formula and is not matched.
- SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): ``h = silu(gate) * up``; for bf16
  ``silu(gate)`` is rounded before the product, as ``act_fn(gate) * up`` does. The matched MLPs
  run ``gate_proj`` and ``up_proj`` as one GEMM (``[N, D] @ [D, 2 I]``: at D = 256, I = 1024 on
  the 2-core Zen 4 the pair's forward took 8.1 ms fused against 11.7 ms as two GEMMs) and the
  op reads that ``[N, 2 I]`` output, so its backward hands the fused GEMMs their gradient.

Both keep fp32 accumulation for bf16. Only the summation order differs from the ATen ops (the
mean of squares, the row dot product of the backward): a rounding change of a few fp32 ulps,
bounded in tests/test_decoder_ops.py. Other dtypes, non-CPU tensors, CPU autocast, a build
without the extension and ``FASTPREF_DECODER_OPS=aten`` take the ATen formulas.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastpref.ops import _native
from fastpref.ops.linear import linear

__all__ = ["decoder_ops_enabled", "rms_norm", "swiglu", "use_fused_decoder_ops"]

# transformers classes whose forward is exactly the formulas above (silu MLPs with gate/up/down)
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def decoder_ops_enabled() -> bool:
    """False under ``FASTPREF_DECODER_OPS=aten`` or without the compiled extension."""
    choice = os.environ.get("FASTPREF_DECODER_OPS", "")
    if choice not in ("", "native", "aten"):
        raise ValueError(
            f"FASTPREF_DECODER_OPS must be 'native' or 'aten' (or unset), got {choice!r}"
        )
    return choice != "aten" and _native.native_available()


def _native_ok(*tensors: Tensor) -> bool:
    dtype = tensors[0].dtype
    return (
        all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
        and dtype in (torch.float32, torch.bfloat16)
        and not torch.is_autocast_enabled("cpu")
        and decoder_ops_enabled()
    )


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = torch.ops.fastpref_C.rms_norm_fwd(x2, weight.contiguous(), eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        g = grad_y.reshape(x2.shape).contiguous()
        dx, dw = torch.ops.fastpref_C.rms_norm_bwd(g, x2, weight.contiguous(), rstd)
        return dx.view(grad_y.shape), dw if ctx.needs_input_grad[1] else None, None


def _rms_norm_aten(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``weight * x / sqrt(mean(x², -1) + eps)``, fp32 inside (``LlamaRMSNorm``'s formula).

    x: ``[..., D]``; weight: ``[D]``, the dtype of ``x``; eps ≥ 0 (Llama's default 1e-6).
    """
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: x {tuple(x.shape)} must end in D and weight be [D], "
            f"got weight {tuple(weight.shape)}"
        )
    if not eps >= 0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")
    if x.numel() == 0 or not _native_ok(x, weight):
        return _rms_norm_aten(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        gu = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
        ctx.save_for_backward(gu)
        ctx.in_shape = gate_up.shape
        h = torch.ops.fastpref_C.swiglu_fwd(gu)
        return h.view(*gate_up.shape[:-1], h.shape[1])

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        (gu,) = ctx.saved_tensors
        g = grad_h.reshape(gu.shape[0], -1).contiguous()
        return torch.ops.fastpref_C.swiglu_bwd(g, gu).view(ctx.in_shape)


def swiglu(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` where ``gate_up`` is ``[..., 2 I]``, ``gate | up`` on its last axis:
    the output of one fused gate/up projection (Phi-3's ``gate_up_proj`` layout); ``[..., I]``."""
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"swiglu: gate_up must be [..., 2 I] (gate | up), got {tuple(gate_up.shape)}"
        )
    if gate_up.numel() == 0 or not _native_ok(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(gate_up)


class FusedRMSNorm(nn.Module):
    """Mixin forward for a matched RMSNorm (its ``weight`` and ``variance_epsilon`` kept)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        if not decoder_ops_enabled():  # FASTPREF_DECODER_OPS=aten, read at every call
            return super().forward(hidden_states)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class FusedSwiGLUMLP(nn.Module):
    """Mixin forward for a matched gate/up/down MLP with a SiLU activation: gate and up as one
    GEMM over their concatenated weights (one pass over ``x``; a [D, 2 I] weight copy per call),
    then the native ``swiglu`` and ``down_proj``."""

    def forward(self, x: Tensor) -> Tensor:
        if not decoder_ops_enabled():
            return super().forward(x)
        gate, up = self.gate_proj, self.up_proj
        weight = torch.cat((gate.weight, up.weight))
        bias = None if gate.bias is None else torch.cat((gate.bias, up.bias))
        return self.down_proj(swiglu(linear(x, weight, bias)))


_fused_classes: dict[tuple[type, type], type] = {}


def _swap(module: nn.Module, mixin: type) -> None:
    base = type(module)
    key = (base, mixin)
    if key not in _fused_classes:
        _fused_classes[key] = type(base.__name__, (mixin, base), {"__module__": base.__module__})
    module.__class__ = _fused_classes[key]


def _is_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return all(
        isinstance(getattr(module, n, None), nn.Linear)
        for n in ("gate_proj", "up_proj", "down_proj")
    ) and (  # fmt: skip
        isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' F.silu
    )


def use_fused_decoder_ops(module: nn.Module) -> int:
    """Give every matched RMSNorm and SiLU MLP of ``module`` (``RMS_NORM_CLASSES``,
    ``MLP_CLASSES``) the native ``rms_norm`` / ``swiglu`` forward; returns how many modules.

    The modules keep their objects, parameters, state_dict keys and hooks; their class becomes a
    subclass of their own (``isinstance`` still holds). 0 where ``decoder_ops_enabled()`` is
    False. Call it again after loading: it skips modules already swapped.
    """
    if not decoder_ops_enabled():
        return 0
    swapped = 0
    for m in module.modules():
        name = type(m).__name__
        if isinstance(m, FusedRMSNorm | FusedSwiGLUMLP):
            continue
        if name in RMS_NORM_CLASSES and hasattr(m, "variance_epsilon"):
            _swap(m, FusedRMSNorm)
            swapped += 1
        elif name in MLP_CLASSES and _is_silu_mlp(m):
            _swap(m, FusedSwiGLUMLP)
            swapped += 1
    return swapped
