"""Fused linear log-probs, backward for narrow ``D`` (<= ``BLOCK_DO``): two Triton kernels.

``_linear_logprobs_bwd_dh_kernel`` programs own a block of rows and loop over the vocabulary,
``_linear_logprobs_bwd_dw_kernel`` programs own a block of vocabulary and loop over the rows;
both recompute the logits tile and turn it into ``G = grad_logp * (onehot(target) - softmax(z))
* dz/du`` (``linear_logprobs_common.grad_raw_logits``), accumulating ``dH = G @ W``,
``dW = G.T @ H`` and ``db = G.sum(0)`` in fp32 registers. No extra memory at all; 2 recomputes +
2 GEMMs of FLOPs (for wider ``D`` each of the ``ceil(D / BLOCK_DO)`` column blocks would
recompute the logits again: ``linear_logprobs_bwd_chunked`` then). Deterministic: no atomics,
fixed summation order. Padded rows get a zero gradient (their dummy ``lse`` could make
``exp(z - lse)`` inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpref.kernels.linear_logprobs_common import (
    block,
    dot,
    grad_raw_logits,
    logits_tile,
    precision,
    upcast,
)

# Kernel signatures and calls keep several arguments per line (grouped by role) rather than
# ruff-format's one per line, which would triple their length.
# fmt: off


@triton.jit
def _linear_logprobs_bwd_dh_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, g_ptr, lse_ptr, dh_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_t, stride_dhn, stride_dhd,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # One program = dH[BLOCK_N rows, BLOCK_DO columns], accumulated in registers over the vocab.
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)  # [BLOCK_DO]
    mask_n = offs_n < N
    mask_do = offs_do < D
    tgt = tl.load(tgt_ptr + offs_n * stride_t, mask=mask_n, other=0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)  # [BLOCK_N, BLOCK_DO]
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        z, dz_du = logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D,
            stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST,
        )
        gu = grad_raw_logits(z, dz_du, offs_n, offs_v, tgt, g, lse, N)  # [BLOCK_N, BLOCK_V]
        w = tl.load(
            w_ptr + offs_v[:, None] * stride_wv + offs_do[None, :] * stride_wd,
            mask=(offs_v < V)[:, None] & mask_do[None, :], other=0.0,
        )  # [BLOCK_V, BLOCK_DO]
        acc = dot(gu.to(w.dtype), w, acc, PRECISION, UPCAST)
    tl.store(
        dh_ptr + offs_n[:, None] * stride_dhn + offs_do[None, :] * stride_dhd,
        acc.to(dh_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_do[None, :],
    )



@triton.jit
def _linear_logprobs_bwd_dw_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, g_ptr, lse_ptr, dw_ptr, db_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_t, stride_dwv, stride_dwd,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # One program = dW[BLOCK_V rows, BLOCK_DO columns] (and db[BLOCK_V] when pid_d == 0),
    # accumulated in registers over all N rows.
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # [BLOCK_V]
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)  # [BLOCK_DO]
    mask_v = offs_v < V
    mask_do = offs_do < D
    acc = tl.zeros([BLOCK_V, BLOCK_DO], dtype=tl.float32)  # [BLOCK_V, BLOCK_DO]
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        tgt = tl.load(tgt_ptr + offs_n * stride_t, mask=mask_n, other=0)
        g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        z, dz_du = logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D,
            stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST,
        )
        gu = grad_raw_logits(z, dz_du, offs_n, offs_v, tgt, g, lse, N)  # [BLOCK_N, BLOCK_V]
        if NEED_WEIGHT:
            h = tl.load(
                h_ptr + offs_n[:, None] * stride_hn + offs_do[None, :] * stride_hd,
                mask=mask_n[:, None] & mask_do[None, :], other=0.0,
            )  # [BLOCK_N, BLOCK_DO]
            acc = dot(tl.trans(gu.to(h.dtype)), h, acc, PRECISION, UPCAST)
        if NEED_BIAS:
            db += tl.sum(gu, axis=0)
    if NEED_WEIGHT:
        tl.store(
            dw_ptr + offs_v[:, None] * stride_dwv + offs_do[None, :] * stride_dwd,
            acc.to(dw_ptr.dtype.element_ty), mask=mask_v[:, None] & mask_do[None, :],
        )
    if NEED_BIAS:
        if pid_d == 0:
            tl.store(db_ptr + offs_v, db.to(db_ptr.dtype.element_ty), mask=mask_v)


# fmt: on
# ----------------------------------------------------------------------------------------------
# launcher


def linear_logprobs_bwd_fused(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    temperature: float,
    softcap: float | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    *,
    BLOCK_DO: int,
    block_n: int | None,
    block_v: int | None,
    block_d: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden, d_weight, d_bias), None where not needed; inputs checked, ``N > 0``, fp32
    ``grad_logp`` and ``lse`` (see ``fastpref.kernels.linear_logprobs.linear_logprobs_bwd``)."""
    (N, D), V, dev = hidden.shape, weight.shape[0], hidden.device
    b = bias if bias is not None else hidden  # dummy pointer when HAS_BIAS is False
    inv_temp = 1.0 / temperature
    cap = float(softcap) if softcap is not None else 1.0
    # the kernels write every element of what they own
    BLOCK_N = block(N, block_n, 64)
    BLOCK_V = block(V, block_v, 64)
    BLOCK_D = block(D, block_d, 32)
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_hidden else None
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need_weight else None
    d_bias = torch.empty(V, dtype=bias.dtype, device=dev) if need_bias else None
    common = dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        BLOCK_N=BLOCK_N,
        BLOCK_V=BLOCK_V,
        BLOCK_D=BLOCK_D,
        BLOCK_DO=BLOCK_DO,
        PRECISION=precision(hidden.dtype),
        UPCAST=upcast(hidden.dtype),
        num_warps=8,
    )
    if need_hidden and D > 0:
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_DO))
        # fmt: off
        _linear_logprobs_bwd_dh_kernel[grid](
            hidden, weight, b, targets, grad_logp, lse, d_hidden,
            N, V, D,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            targets.stride(0), d_hidden.stride(0), d_hidden.stride(1),
            inv_temp, cap, **common,
        )
        # fmt: on
    if need_weight or need_bias:
        dw = d_weight if d_weight is not None else weight  # dummy pointer when not needed
        # Only column block 0 writes d_bias; without d_weight one column block is enough.
        grid_d = max(1, triton.cdiv(D, BLOCK_DO)) if need_weight else 1
        grid = (triton.cdiv(V, BLOCK_V), grid_d)
        # fmt: off
        _linear_logprobs_bwd_dw_kernel[grid](
            hidden, weight, b, targets, grad_logp, lse, dw, d_bias if d_bias is not None else b,
            N, V, D,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            targets.stride(0), dw.stride(0), dw.stride(1),
            inv_temp, cap, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, **common,
        )
        # fmt: on
    return d_hidden, d_weight, d_bias
