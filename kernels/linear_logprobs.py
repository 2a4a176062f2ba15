"""Fused linear log-probs: Triton kernels (Cut Cross-Entropy style) and their launchers.

What is fused
    logits = hidden @ weight.T (+ bias), the optional softcap ``softcap * tanh(z / softcap)``,
    the temperature ``z / temperature``, the log-sum-exp over the vocabulary and the pick of
    the target logit: forward returns ``logp = z[target] - lse`` and ``lse`` per row.
    Backward recomputes the logits tile by tile and turns them straight into
    ``G = grad_logp * (onehot(target) - softmax(z))``, chained through temperature and softcap,
    then into ``dH = G @ W``, ``dW = G.T @ H`` and ``db = G.sum(0)``.

What is never materialised
    The ``N x V`` logits and probabilities. A program holds one ``[BLOCK_N, BLOCK_V]`` fp32 tile in
    registers at a time. Forward extra memory: the ``[N]`` fp32 ``logp`` and ``lse`` (8 bytes/row).

The backward: two deterministic schemes (no atomics, fixed summation order, bitwise reproducible)
    fused (chosen when ``D <= BLOCK_DO``, default 128): ``_bwd_dh_kernel`` programs own a block of
        rows and loop over the vocabulary, ``_bwd_dw_kernel`` programs own a block of vocabulary
        and loop over the rows; both recompute the logits and accumulate ``dH``/``dW``/``db`` in
        registers. No extra memory at all; 2 recomputes + 2 GEMMs of FLOPs. For wider ``D`` each
        of the ``ceil(D / BLOCK_DO)`` column blocks would recompute the logits again, so instead:
    chunked (wider ``D``): ``_bwd_dlogits_kernel`` recomputes the logits once and writes
        ``G`` for a chunk of ``V_c`` vocabulary columns, ``[N, V_c]`` in the input dtype, then two
        plain GEMMs (cuBLAS, deterministic) give ``dH += G_c @ W_c`` and ``dW_c = G_c.T @ H``, and
        ``db_c = G_c.sum(0)`` in fp32. 1 recompute + 2 GEMMs: with the forward, the 4-GEMM floor.
        Extra memory: the chunk (``chunk_bytes``, default 256 MiB, independent of ``V``) plus an
        fp32 ``[N, D]`` accumulator for ``dH`` when there are several chunks and ``hidden`` is
        16-bit (each chunk's ``G_c @ W_c`` is then rounded to the input dtype once before the
        fp32 sum).

Why the numerics are safe
    Every tile product accumulates in fp32 (``tl.dot`` with an fp32 accumulator, also for bf16 and
    fp16 inputs). The log-sum-exp is the online (running max, rescaled running sum) form, so no
    ``exp`` ever sees a positive argument and wide logits (std ~20) only underflow harmlessly to 0.
    tanh is built from ``exp(-2|x|)`` (never overflows) with a short odd Taylor series near 0
    where ``1 - exp(-2|x|)`` would cancel. The backward uses the saved fp32 ``lse``:
    ``softmax = exp(z - lse)`` is <= 1 by construction. Padded vocabulary columns are set to
    ``-inf`` (probability exactly 0) and padded rows get a zero gradient, so the ragged edges of
    ``N``, ``V`` and ``D`` never leak into sums.

fp32 ``tl.dot`` uses TF32 only when torch would (``torch.get_float32_matmul_precision()`` is not
"highest"); otherwise IEEE fp32. On CPU tensors these kernels run under ``TRITON_INTERPRET=1``
(set before triton is imported), which is how the test suite verifies them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# device helpers
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
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST is set only under TRITON_INTERPRET for bf16: the interpreter multiplies bf16 bit
    # patterns as integers (triton-lang/triton#11584). bf16 x bf16 products are exact in fp32, so
    # upcasting first gives what the GPU's fp32-accumulating tensor-core dot gives.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _logits_tile(
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
        acc = _dot(h, w, acc, PRECISION, UPCAST)
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
def _grad_raw_logits(z, dz_du, offs_n, offs_v, tgt, g, lse, N):
    """dLoss/d(raw logit) of one tile: g * (onehot(target) - softmax(z)) * dz/du, fp32.

    Padded rows are forced to 0: their lse is a dummy, so exp(z - lse) may be inf there.
    """
    p = tl.exp(z - lse[:, None])  # [BLOCK_N, BLOCK_V], 0 in padded columns
    onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
    gu = g[:, None] * (onehot - p) * dz_du
    return tl.where((offs_n < N)[:, None], gu, 0.0)


# ----------------------------------------------------------------------------------------------
# kernels


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
        z, _ = _logits_tile(
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
        z, dz_du = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D,
            stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST,
        )
        gu = _grad_raw_logits(z, dz_du, offs_n, offs_v, tgt, g, lse, N)  # [BLOCK_N, BLOCK_V]
        w = tl.load(
            w_ptr + offs_v[:, None] * stride_wv + offs_do[None, :] * stride_wd,
            mask=(offs_v < V)[:, None] & mask_do[None, :], other=0.0,
        )  # [BLOCK_V, BLOCK_DO]
        acc = _dot(gu.to(w.dtype), w, acc, PRECISION, UPCAST)
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
        z, dz_du = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D,
            stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST,
        )
        gu = _grad_raw_logits(z, dz_du, offs_n, offs_v, tgt, g, lse, N)  # [BLOCK_N, BLOCK_V]
        if NEED_WEIGHT:
            h = tl.load(
                h_ptr + offs_n[:, None] * stride_hn + offs_do[None, :] * stride_hd,
                mask=mask_n[:, None] & mask_do[None, :], other=0.0,
            )  # [BLOCK_N, BLOCK_DO]
            acc = _dot(tl.trans(gu.to(h.dtype)), h, acc, PRECISION, UPCAST)
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
    z, dz_du = _logits_tile(
        h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D,
        stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST,
    )
    gu = _grad_raw_logits(z, dz_du, offs_n, offs_v, tgt, g, lse, N)  # [BLOCK_N, BLOCK_V]
    tl.store(
        du_ptr + offs_n[:, None] * stride_dun + (offs_v - v_start)[None, :] * stride_duv,
        gu.to(du_ptr.dtype.element_ty),
        mask=mask_n[:, None] & (offs_v < v_stop)[None, :],
    )


# fmt: on
# ----------------------------------------------------------------------------------------------
# launchers


def _block(size: int, default: int | None, cap: int) -> int:
    # Power of two, at least 16 (tl.dot's minimum), no larger than the problem needs.
    if default is not None:
        if default < 16 or default & (default - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {default}")
        return default
    return min(cap, max(16, triton.next_power_of_2(max(size, 1))))


# Under TRITON_INTERPRET (read when triton.jit decorates) the kernels are InterpretedFunctions.
_INTERPRETED = not isinstance(_linear_logprobs_fwd_kernel, triton.runtime.JITFunction)


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs use TF32 only when torch's own matmuls would.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _on_inputs_device(launcher):
    # Triton launches on the current CUDA device: make it the inputs' (cuda:1 under cuda:0).
    @functools.wraps(launcher)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        guard = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
        with guard:
            return launcher(first, *args, **kwargs)

    return wrapper


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
) -> tuple[int, int, int]:
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
    if hidden.dtype not in _DTYPES:
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
        if bias.dtype not in _DTYPES:
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
    if N > 0:
        bad = (targets < 0) | (targets >= V)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets[{i}] = {int(targets[i])} is outside [0, V) with V = {V} "
                "(ignored rows must be removed before the Triton launcher)"
            )
    return N, D, V


def _check_row_vector(name: str, t: torch.Tensor, N: int, device: torch.device) -> torch.Tensor:
    if t.shape != (N,):
        raise ValueError(f"{name} must be [N] = [{N}], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    return t.to(torch.float32).contiguous()


@_on_inputs_device
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row target log-probability and log-sum-exp, without the N x V logits.

    ``z = hidden @ weight.T + bias``; ``z = softcap * tanh(z / softcap)`` if softcap;
    ``z = z / temperature``; returns ``(z[target] - lse, lse)`` with ``lse = logsumexp(z)``, both
    ``[N]`` fp32. Equals ``z.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]`` and
    ``z.float().logsumexp(-1)``; extra memory is the two ``[N]`` outputs (Cut Cross-Entropy,
    https://arxiv.org/abs/2411.09009). Rows must be compacted: every target in ``[0, V)``.
    ``block_*`` override the tile sizes (powers of two >= 16); None picks them from the shape.
    """
    N, D, V = _check_inputs(hidden, weight, targets, bias, temperature, softcap)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return logp, lse
    BLOCK_N = _block(N, block_n, 64)
    BLOCK_V = _block(V, block_v, 128)
    BLOCK_D = _block(D, block_d, 64)
    grid = (triton.cdiv(N, BLOCK_N),)
    # fmt: off
    _linear_logprobs_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, logp, lse,
        N, V, D,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), targets.stride(0),
        1.0 / temperature, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
        PRECISION=_precision(hidden.dtype), UPCAST=_upcast(hidden.dtype),
        num_warps=8,
    )
    # fmt: on
    return logp, lse


@_on_inputs_device
def linear_logprobs_bwd(
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
    mode: str | None = None,
    chunk_bytes: int = 256 << 20,
    block_n: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    block_do: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)`` w.r.t. hidden, weight and bias, recomputing logits.

    With ``G = grad_logp[:, None] * (onehot(targets) - softmax(z)) * dz/du`` (``u`` the raw
    logits, ``dz/du = (1 - tanh(u / softcap)^2) / temperature``): ``d_hidden = G @ weight``,
    ``d_weight = G.T @ hidden``, ``d_bias = G.sum(0)``, each in its input's dtype with fp32
    accumulation; None where not needed. ``lse`` is the forward's. Deterministic (no atomics).
    Equals autograd through the plain-PyTorch forward in ``linear_logprobs_fwd``'s docstring.
    ``mode`` is "fused" or "chunked" (module docstring); None picks fused iff ``D <= BLOCK_DO``.
    ``chunk_bytes`` bounds the chunked mode's ``G`` buffer; ``block_*`` override tile sizes.
    """
    N, D, V = _check_inputs(hidden, weight, targets, bias, temperature, softcap)
    grad_logp = _check_row_vector("grad_logp", grad_logp, N, hidden.device)
    lse = _check_row_vector("lse", lse, N, hidden.device)
    if need_bias and bias is None:
        raise ValueError("need_bias=True but bias is None")
    if mode not in (None, "fused", "chunked"):
        raise ValueError(f"mode must be None, 'fused' or 'chunked', got {mode!r}")
    dev = hidden.device
    if N == 0:  # nothing to launch: zero gradients
        d_hidden = hidden.new_zeros(hidden.shape) if need_hidden else None
        d_weight = weight.new_zeros(weight.shape) if need_weight else None
        d_bias = bias.new_zeros(V) if need_bias else None
        return d_hidden, d_weight, d_bias
    BLOCK_DO = _block(D, block_do, 128)
    if mode is None:
        mode = "fused" if D <= BLOCK_DO else "chunked"
    precision, upcast = _precision(hidden.dtype), _upcast(hidden.dtype)
    b = bias if bias is not None else hidden  # dummy pointer when HAS_BIAS is False
    inv_temp = 1.0 / temperature
    cap = float(softcap) if softcap is not None else 1.0

    if mode == "chunked":
        BLOCK_N = _block(N, block_n, 64)
        BLOCK_V = _block(V, block_v, 128)
        BLOCK_D = _block(D, block_d, 64)
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
                PRECISION=precision, UPCAST=upcast, num_warps=8,
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

    # fused: the kernels write every element of what they own
    BLOCK_N = _block(N, block_n, 64)
    BLOCK_V = _block(V, block_v, 64)
    BLOCK_D = _block(D, block_d, 32)
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
        PRECISION=precision,
        UPCAST=upcast,
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
