"""Fused linear log-probs, forward: ``logp = z[target] - lse`` and ``lse`` per row (one kernel).

What is fused: ``z = f(hidden @ weight.T + bias)`` tile by tile (``f``: softcap, temperature; see
``linear_logprobs_common``), an online log-sum-exp over the vocabulary and the pick of the target
logit. Never materialised: the ``N x V`` logits; a program holds one ``[BLOCK_N, BLOCK_V]`` fp32
tile at a time, extra memory is the two ``[N]`` fp32 outputs. Numerics: running max and rescaled
running sum, so ``exp`` never sees a positive argument (wide logits only underflow to 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpref.kernels.linear_logprobs_common import (
    block,
    check_inputs,
    logits_tile,
    on_inputs_device,
    precision,
    upcast,
)

# Kernel signatures and calls keep several arguments per line (grouped by role) rather than
# ruff-format's one per line, which would triple their length.
# fmt: off


@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, logp_ptr, lse_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_t,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # One program = BLOCK_N rows; it walks the whole vocabulary keeping a running max and sum.
    pid = tl.program_id(0)
    # Row and vocabulary indices are int64 so that index * stride cannot overflow for V * D or
    # N * D >= 2^31 (e.g. a 256k vocabulary at D = 8192).
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    mask_n = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n * stride_t, mask=mask_n, other=0)  # [BLOCK_N]
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # running max
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # running sum of exp(z - m)
    z_tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # [BLOCK_V]
        z, _ = logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D,
            stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST,
        )  # [BLOCK_N, BLOCK_V]
        # Every tile holds at least one real column (v0 < V), so m_new is finite for finite input.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        z_tgt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    lse = m + tl.log(s)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(logp_ptr + offs_n, z_tgt - lse, mask=mask_n)


# fmt: on
# ----------------------------------------------------------------------------------------------
# launcher


@on_inputs_device
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    check_targets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row target log-probability and log-sum-exp, without the N x V logits.

    ``z = hidden @ weight.T + bias``; ``z = softcap * tanh(z / softcap)`` if softcap;
    ``z = z / temperature``; returns ``(z[target] - lse, lse)`` with ``lse = logsumexp(z)``, both
    ``[N]`` fp32. Equals ``z.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]`` and
    ``z.float().logsumexp(-1)``; extra memory is the two ``[N]`` outputs (Cut Cross-Entropy,
    https://arxiv.org/abs/2411.09009). Rows must be compacted: every target in ``[0, V)``.
    ``block_*`` override the tile sizes (powers of two >= 16); None picks them from the shape.
    ``check_targets=False`` skips the target range scan for callers that did it (fastpref.ops).
    """
    N, D, V = check_inputs(hidden, weight, targets, bias, temperature, softcap, check_targets)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return logp, lse
    BLOCK_N = block(N, block_n, 64)
    BLOCK_V = block(V, block_v, 128)
    BLOCK_D = block(D, block_d, 64)
    grid = (triton.cdiv(N, BLOCK_N),)
    # fmt: off
    _linear_logprobs_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, logp, lse,
        N, V, D,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), targets.stride(0),
        1.0 / temperature, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
        PRECISION=precision(hidden.dtype), UPCAST=upcast(hidden.dtype),
        num_warps=8,
    )
    # fmt: on
    return logp, lse
