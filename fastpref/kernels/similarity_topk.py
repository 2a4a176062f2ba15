"""Similarity top-k in Triton: one kernel that turns a corpus block's scores into ranking keys.

What is fused: ``s = q @ c.T`` for a ``[BLOCK_B, BLOCK_M]`` tile (fp32 ``tl.dot`` of the inputs
widened to fp32), the optional cosine scale ``s * inv_norm[c]``, and the encoding of each
(score, corpus index) as the int64 key whose ``>`` is the ranking order (descending score,
ascending index, NaN last; see ``fastpref.ops._similarity_topk_chunked``). The launcher writes
one block of corpus rows ``[start, stop)`` at a time; ``torch.topk`` on the keys merges blocks
into the running top k (``fastpref.ops``). Never materialised: the ``B x M`` scores; extra memory
is the ``[B, stop - start]`` keys of one block. fp32 ``tl.dot`` uses TF32 only when torch would.
On CPU tensors the kernel runs under ``TRITON_INTERPRET=1``, which is how the tests verify it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpref.kernels.linear_logprobs_common import DTYPES, block, on_inputs_device, precision

# fmt: off


@triton.jit
def _similarity_topk_keys_kernel(
    q_ptr, c_ptr, inv_ptr, keys_ptr,
    B, D, start, stop,
    stride_qb, stride_qd, stride_cm, stride_cd, stride_kb, stride_km,
    HAS_SCALE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # [BLOCK_B]
    offs_m = (start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M], global
    mask_b = offs_b < B
    mask_m = offs_m < stop
    acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)  # [BLOCK_B, BLOCK_M]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q = tl.load(
            q_ptr + offs_b[:, None] * stride_qb + offs_d[None, :] * stride_qd,
            mask=mask_b[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)  # [BLOCK_B, BLOCK_D]
        c = tl.load(
            c_ptr + offs_m[None, :] * stride_cm + offs_d[:, None] * stride_cd,
            mask=mask_m[None, :] & mask_d[:, None], other=0.0,
        ).to(tl.float32)  # [BLOCK_D, BLOCK_M] (loaded transposed)
        acc = tl.dot(q, c, acc, input_precision=PRECISION)
    if HAS_SCALE:
        inv = tl.load(inv_ptr + offs_m, mask=mask_m, other=1.0)  # [BLOCK_M]
        acc = acc * inv[None, :]
    s = tl.where(acc == 0.0, 0.0, acc)  # -0 ties with +0
    bits = s.to(tl.int32, bitcast=True)
    o = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    o = tl.where(s != s, -2147483647 - 1, o)  # NaN below every number
    key = o.to(tl.int64) * 4294967296 + (4294967295 - offs_m)  # [BLOCK_B, BLOCK_M]
    tl.store(
        keys_ptr + offs_b[:, None] * stride_kb + (offs_m - start)[None, :] * stride_km,
        key, mask=mask_b[:, None] & mask_m[None, :],
    )


# fmt: on
# ----------------------------------------------------------------------------------------------
# launcher


@on_inputs_device
def similarity_topk_keys(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    start: int,
    stop: int,
    inv_norm: torch.Tensor | None = None,
    *,
    block_b: int | None = None,
    block_m: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """int64 ranking keys ``[B, stop - start]`` of corpus rows ``[start, stop)``.

    The score of query b and corpus row j is ``queries[b] . corpus[j]`` in fp32 (times
    ``inv_norm[j]`` when given); equals ``pack_keys((q.float() @ c[start:stop].float().T) *
    inv_norm[start:stop], start)`` of ``fastpref.ops._similarity_topk_chunked``.
    ``block_*`` override the tile sizes (powers of two >= 16).
    """
    for name, x in (("queries", queries), ("corpus", corpus)):
        if x.dim() != 2 or x.dtype not in DTYPES:
            raise ValueError(
                f"{name} must be a 2-D float32, bfloat16 or float16 tensor, got {x.dtype} "
                f"{tuple(x.shape)}"
            )
    (B, D), M = queries.shape, corpus.shape[0]
    if corpus.shape[1] != D or corpus.device != queries.device:
        raise ValueError(
            f"corpus {tuple(corpus.shape)} on {corpus.device} must share D and the device with "
            f"queries {tuple(queries.shape)} on {queries.device}"
        )
    if not 0 <= start <= stop <= M:
        raise ValueError(f"need 0 <= start <= stop <= M = {M}, got start={start}, stop={stop}")
    if inv_norm is not None and (inv_norm.shape != (M,) or inv_norm.dtype != torch.float32):
        raise ValueError(f"inv_norm must be float32 [M] = [{M}], got {inv_norm.dtype} "
                         f"{tuple(inv_norm.shape)}")  # fmt: skip
    keys = torch.empty(B, stop - start, dtype=torch.int64, device=queries.device)
    if B == 0 or stop == start:
        return keys
    BLOCK_B = block(B, block_b, 64)
    BLOCK_M = block(stop - start, block_m, 64)
    BLOCK_D = block(D, block_d, 32)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(stop - start, BLOCK_M))
    # fmt: off
    _similarity_topk_keys_kernel[grid](
        queries, corpus, inv_norm if inv_norm is not None else corpus, keys,
        B, D, start, stop,
        queries.stride(0), queries.stride(1), corpus.stride(0), corpus.stride(1),
        keys.stride(0), keys.stride(1),
        HAS_SCALE=inv_norm is not None,
        BLOCK_B=BLOCK_B, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
        PRECISION=precision(torch.float32), num_warps=4,
    )
    # fmt: on
    return keys
