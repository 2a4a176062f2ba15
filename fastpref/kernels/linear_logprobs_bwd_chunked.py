"""Fused linear log-probs, backward by vocabulary chunks (wide ``D``): one Triton kernel + GEMMs.

``_linear_logprobs_bwd_dlogits_kernel`` recomputes the logits once and writes
``G = grad_logp * (onehot(target) - softmax(z)) * dz/du`` for a chunk of ``V_c`` vocabulary
columns, ``[N, V_c]`` in the input dtype; two plain GEMMs (cuBLAS, deterministic) then give
``dH += G_c @ W_c`` and ``dW_c = G_c.T @ H``, and ``db_c = G_c.sum(0)`` in fp32. 1 recompute +
2 GEMMs: with the forward, the 4-GEMM floor. Extra memory: the chunk (``chunk_bytes``,
independent of ``V``) plus an fp32 ``[N, D]`` ``dH`` accumulator when there are several chunks
and ``hidden`` is 16-bit (each chunk's ``G_c @ W_c`` is rounded to the input dtype once before
the fp32 sum). Numerics: ``softmax = exp(z - lse)`` with the forward's fp32 ``lse`` is <= 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpref.kernels.linear_logprobs_common import (
    block,
    grad_raw_logits,
    logits_tile,
    precision,
    upcast,
)

# Kernel signatures and calls keep several arguments per line (grouped by role) rather than
# ruff-format's one per line, which would triple their length.
# fmt: off


@triton.jit
def _linear_logprobs_bwd_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, g_ptr, lse_ptr, du_ptr,
    N, V, D, v_start, v_stop,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_t, stride_dun, stride_duv,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # One program = one [BLOCK_N, BLOCK_V] tile of dLoss/d(raw logits) for vocabulary columns
    # [v_start, v_stop), written to the chunk buffer du[:, v - v_start] in the input dtype.
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    # [BLOCK_V], global vocabulary column
    offs_v = (v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
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
    tl.store(
        du_ptr + offs_n[:, None] * stride_dun + (offs_v - v_start)[None, :] * stride_duv,
        gu.to(du_ptr.dtype.element_ty),
        mask=mask_n[:, None] & (offs_v < v_stop)[None, :],
    )


# fmt: on
# ----------------------------------------------------------------------------------------------
# launcher


def linear_logprobs_bwd_chunked(
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
    chunk_bytes: int,
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
    prec, up = precision(hidden.dtype), upcast(hidden.dtype)
    BLOCK_N = block(N, block_n, 64)
    BLOCK_V = block(V, block_v, 128)
    BLOCK_D = block(D, block_d, 64)
    # Chunk width: a multiple of BLOCK_V with N * V_c * itemsize <= chunk_bytes (>= 1 tile).
    per_tile = N * BLOCK_V * hidden.element_size()
    V_c = BLOCK_V * max(1, min(chunk_bytes // per_tile, triton.cdiv(V, BLOCK_V)))
    g_chunk = torch.empty(N, V_c, dtype=hidden.dtype, device=dev)
    several = V_c < V
    d_hidden = d_weight = d_bias = None
    if need_hidden:
        d_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev)
        # 16-bit hidden over several chunks: sum the chunk products in fp32.
        dh_acc = d_hidden if hidden.dtype == torch.float32 or not several else d_hidden.float()
    if need_weight:
        d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=dev)
    if need_bias:
        d_bias = torch.empty(V, dtype=bias.dtype, device=dev)
    for v0 in range(0, V, V_c):
        v1 = min(V, v0 + V_c)
        g_c = g_chunk[:, : v1 - v0]  # [N, V_c]
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(v1 - v0, BLOCK_V))
        # fmt: off
        _linear_logprobs_bwd_dlogits_kernel[grid](
            hidden, weight, b, targets, grad_logp, lse, g_c,
            N, V, D, v0, v1,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            targets.stride(0), g_c.stride(0), g_c.stride(1),
            inv_temp, cap,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
            PRECISION=prec, UPCAST=up, num_warps=8,
        )
        # fmt: on
        w_c = weight[v0:v1]  # [V_c, D]
        if need_hidden:
            if dh_acc.dtype == g_c.dtype:
                dh_acc.addmm_(g_c, w_c)
            else:
                dh_acc += torch.mm(g_c, w_c)
        if need_weight:
            torch.mm(g_c.T, hidden, out=d_weight[v0:v1])
        if need_bias:
            d_bias[v0:v1] = g_c.sum(0, dtype=torch.float32)
    if need_hidden and dh_acc is not d_hidden:
        d_hidden.copy_(dh_acc)
    return d_hidden, d_weight, d_bias
