"""Shared pieces of the linear log-probs Triton kernels: the logits tile and its gradient
(``@triton.jit`` device functions) and the launchers' block choice, precision and input checks.

The tile: ``z = f(h @ w.T + b)`` for one ``[BLOCK_N, BLOCK_V]`` block, ``f`` the softcap
``softcap * tanh(u / softcap)`` (optional) then ``/ temperature``, accumulated in fp32 by
``tl.dot`` over ``BLOCK_D`` slices; padded vocabulary columns are ``-inf`` (probability exactly
0) and padded rows get a zero gradient, so ragged edges never leak into sums. tanh is built
from ``exp(-2|x|)`` (never overflows) with a short odd series near 0, where ``1 - exp(-2|x|)``
would cancel. fp32 ``tl.dot`` uses TF32 only when torch would.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Kernel signatures and calls keep several arguments per line (grouped by role) rather than
# ruff-format's one per line, which would triple their length.
# fmt: off


@triton.jit
def _tanh(x):
    # tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: never overflows. Near 0 the
    # numerator cancels, so there use x - x^3/3 + 2x^5/15 - 17x^7/315 (error < 1e-12 at |x| < 1/16).
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    return tl.where(a < 0.0625, series, t)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST is set only under TRITON_INTERPRET for bf16: the interpreter multiplies bf16 bit
    # patterns as integers (triton-lang/triton#11584). bf16 x bf16 products are exact in fp32, so
    # upcasting first gives what the GPU's fp32-accumulating tensor-core dot gives.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def logits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Final logits of one tile and d(final logit)/d(raw logit), both [BLOCK_N, BLOCK_V] fp32.

    Padded columns (v >= V) are -inf in the logits and 0 in the derivative.
    """
    mask_n = offs_n < N
    mask_v = offs_v < V
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)  # [BLOCK_N, BLOCK_V]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(
            h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        w = tl.load(
            w_ptr + offs_v[None, :] * stride_wv + offs_d[:, None] * stride_wd,
            mask=mask_v[None, :] & mask_d[:, None], other=0.0,
        )  # [BLOCK_D, BLOCK_V]  (W tile loaded transposed: no tl.trans needed)
        acc = dot(h, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)  # [BLOCK_V]
        acc = acc + b[None, :]
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)  # [BLOCK_N, BLOCK_V]
        z = softcap * t * inv_temp
        dz_du = (1.0 - t * t) * inv_temp
    else:
        z = acc * inv_temp
        dz_du = tl.full([BLOCK_N, BLOCK_V], 1.0, dtype=tl.float32) * inv_temp
    z = tl.where(mask_v[None, :], z, float("-inf"))
    dz_du = tl.where(mask_v[None, :], dz_du, 0.0)
    return z, dz_du


@triton.jit
def grad_raw_logits(z, dz_du, offs_n, offs_v, tgt, g, lse, N):
    """dLoss/d(raw logit) of one tile: g * (onehot(target) - softmax(z)) * dz/du, fp32.

    Padded rows are forced to 0: their lse is a dummy, so exp(z - lse) may be inf there.
    """
    p = tl.exp(z - lse[:, None])  # [BLOCK_N, BLOCK_V], 0 in padded columns
    onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
    gu = g[:, None] * (onehot - p) * dz_du
    return tl.where((offs_n < N)[:, None], gu, 0.0)



# fmt: on
# ----------------------------------------------------------------------------------------------
# launcher helpers


def block(size: int, default: int | None, cap: int) -> int:
    # Power of two, at least 16 (tl.dot's minimum), no larger than the problem needs.
    if default is not None:
        if default < 16 or default & (default - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {default}")
        return default
    return min(cap, max(16, triton.next_power_of_2(max(size, 1))))


# Under TRITON_INTERPRET (read when triton.jit decorates) the kernels are InterpretedFunctions.
_INTERPRETED = not isinstance(_tanh, triton.runtime.JITFunction)


def upcast(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs use TF32 only when torch's own matmuls would.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def on_inputs_device(launcher):
    # Triton launches on the current CUDA device: make it the inputs' (cuda:1 under cuda:0).
    @functools.wraps(launcher)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        guard = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
        with guard:
            return launcher(first, *args, **kwargs)

    return wrapper


def check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    check_targets: bool,
) -> tuple[int, int, int]:
    """(N, D, V) after the shape, dtype and device checks (ValueError naming the argument).

    ``check_targets`` adds the per-element range scan of ``targets``, for callers that did not
    check them (fastpref.ops does, once, and passes False). The kernels only compare targets with
    a tile's column indices and never load through one, so an unchecked bad target cannot read
    out of bounds: its row's ``logp`` is just ``-lse``.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    N, D = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(
            f"weight [V, D] must share D with hidden [N, D]: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if V == 0:
        raise ValueError(f"weight must have at least one row (V > 0), got {tuple(weight.shape)}")
    if hidden.dtype not in DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight and hidden must have the same dtype: hidden {hidden.dtype}, "
            f"weight {weight.dtype}"
        )
    if targets.shape != (N,):
        raise ValueError(
            f"targets must be [N] = [{N}] like hidden {tuple(hidden.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    tensors = {"hidden": hidden, "weight": weight, "targets": targets}
    if bias is not None:
        if bias.shape != (V,):
            raise ValueError(
                f"bias must be [V] = [{V}] like weight {tuple(weight.shape)}, "
                f"got {tuple(bias.shape)}"
            )
        if bias.dtype not in DTYPES:
            raise ValueError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != hidden.device:
            raise ValueError(
                f"{name} is on {t.device} but hidden is on {hidden.device}: all on one device"
            )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if check_targets and N > 0:
        bad = (targets < 0) | (targets >= V)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets[{i}] = {int(targets[i])} is outside [0, V) with V = {V} "
                "(ignored rows must be removed before the Triton launcher)"
            )
    return N, D, V


def check_row_vector(name: str, t: torch.Tensor, N: int, device: torch.device) -> torch.Tensor:
    if t.shape != (N,):
        raise ValueError(f"{name} must be [N] = [{N}], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    return t.to(torch.float32).contiguous()
