"""Fused listwise ranking losses (fastpref.listwise_loss): Triton kernels and their launcher.

What is fused
    Per list (one program each): the loss and d loss / d scores of ranknet / lambda / lipo (with
    optional FIRST weights), listnet or listmle, in one launch. The formulas are those of
    csrc/include/fastpref/listwise_math.h (the C++ and CUDA kernels' shared header), written
    again in Triton: rank by score τ, gold rank ρ and ideal position π by counting, gains
    G = 2^r − 1, discounts 1/log2(1 + rank), pair weights, softplus/sigmoid of one exp(−|x|).

What is never materialised
    The B×K×K pair tensor. A program holds one [BLOCK, BLOCK] tile of pairs in registers and
    loops over the K×K tiles of its list. Extra global memory: two [B, K] fp32 scratch rows
    (per-item discount and gold rank for the pairwise kinds; ListMLE's reverse log-sum-exps),
    plus the [B, K] gradient that is returned.

Why the numerics are safe
    softplus(−x) = max(−x, 0) + log1p(e) and sigmoid(−x) = (x < 0 ? 1 : e)/(1 + e) with
    e = exp(−|x|) ≤ 1; log1p via the exact-rounding identity log(u)·e/(u − 1), u = 1 + e.
    ListNet subtracts the maxima before its exps. ListMLE's reverse logcumsumexp at item i is an
    online (running max, rescaled sum) log-sum-exp over the items ranked at or after i, and its
    gradient sums exp(σs_j − cum_i) ≤ 1. All in fp32 whatever the input dtype.

Schedule
    Pairwise kinds: pass 1 computes each item's discount 1/log2(1 + τ), gold rank and
    ideal-DCG term (O(K²) comparisons), pass 2 sweeps the pair tiles; a thread barrier separates
    the passes because pass 2 reads what other threads of the program wrote. ListMLE: O(K²)
    masked log-sum-exps instead of a sort (the order is "r_j < r_i, or tie and j ≥ i"), so no
    sorting network is needed. Verified on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The integer codes of fastpref.ops.listwise.KINDS / listwise_math.h.
RANKNET, LAMBDA, LISTNET, LISTMLE, LIPO = 0, 1, 2, 3, 4
WEIGHT_FIRST = 1

# Kernel signatures keep several arguments per line (grouped by role).
# fmt: off


@triton.jit
def _log1p(e):
    # log(1 + e) for e in [0, 1] to full precision: log(u) * e / (u - 1) cancels u's rounding.
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))


@triton.jit
def _load_list(s_ptr, r_ptr, m_ptr, offs, K, HAS_MASK: tl.constexpr):
    inb = offs < K
    s = tl.load(s_ptr + offs, mask=inb, other=0.0)
    r = tl.load(r_ptr + offs, mask=inb, other=0.0)
    real = inb
    if HAS_MASK:
        real = real & (tl.load(m_ptr + offs, mask=inb, other=0) != 0)
    return s, r, real


@triton.jit
def _listwise_pairwise_kernel(
    s_ptr, r_ptr, m_ptr, loss_ptr, grad_ptr, disc_ptr, gold_ptr,
    K, sigma,
    KIND: tl.constexpr, WEIGHTING: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s_row, r_row, m_row = s_ptr + b * K, r_ptr + b * K, m_ptr + b * K
    ar = tl.arange(0, BLOCK)
    # pass 1: per-item discount by current rank, gold rank, ideal-DCG term, number of real items
    n_real = 0.0
    idcg = 0.0
    for i0 in range(0, K, BLOCK):
        oi = i0 + ar
        si, ri, real_i = _load_list(s_row, r_row, m_row, oi, K, HAS_MASK)
        n_real += tl.sum(tl.where(real_i, 1.0, 0.0), 0)
        if KIND == LAMBDA or KIND == LIPO or WEIGHTING == WEIGHT_FIRST:  # ranknet needs none
            tau = tl.zeros([BLOCK], dtype=tl.float32) + 1.0  # rank by score
            pos = tl.zeros([BLOCK], dtype=tl.float32) + 1.0  # rank by relevance (ideal position)
            gold = tl.zeros([BLOCK], dtype=tl.float32) + 1.0  # competition rank by relevance
            for j0 in range(0, K, BLOCK):
                oj = j0 + ar
                sj, rj, real_j = _load_list(s_row, r_row, m_row, oj, K, HAS_MASK)
                other = real_j[None, :] & (oj[None, :] != oi[:, None])  # [BLOCK, BLOCK]
                before = oj[None, :] < oi[:, None]
                s_ahead = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & before)
                r_ahead = (rj[None, :] > ri[:, None]) | ((rj[None, :] == ri[:, None]) & before)
                tau += tl.sum(tl.where(other & s_ahead, 1.0, 0.0), 1)
                pos += tl.sum(tl.where(other & r_ahead, 1.0, 0.0), 1)
                gold += tl.sum(tl.where(other & (rj[None, :] > ri[:, None]), 1.0, 0.0), 1)
            gain = tl.exp2(ri) - 1.0
            idcg += tl.sum(tl.where(real_i, gain / tl.log2(1.0 + pos), 0.0), 0)
            tl.store(disc_ptr + b * K + oi, 1.0 / tl.log2(1.0 + tau), mask=oi < K)
            tl.store(gold_ptr + b * K + oi, gold, mask=oi < K)
    tl.debug_barrier()  # pass 2 reads items other threads stored
    inv_idcg = tl.where(idcg > 0.0, 1.0 / idcg, 0.0)
    keep = n_real >= 2.0
    # pass 2: the pair tiles; item i's row gets the pairs it wins (loss) and both directions (grad)
    total = 0.0
    for i0 in range(0, K, BLOCK):
        oi = i0 + ar
        si, ri, real_i = _load_list(s_row, r_row, m_row, oi, K, HAS_MASK)
        di = tl.zeros([BLOCK], dtype=tl.float32)
        gi = tl.zeros([BLOCK], dtype=tl.float32) + 1.0
        if KIND == LAMBDA or KIND == LIPO or WEIGHTING == WEIGHT_FIRST:
            di = tl.load(disc_ptr + b * K + oi, mask=oi < K, other=0.0)
            gi = tl.load(gold_ptr + b * K + oi, mask=oi < K, other=1.0)
        loss_i = tl.zeros([BLOCK], dtype=tl.float32)
        grad_i = tl.zeros([BLOCK], dtype=tl.float32)
        for j0 in range(0, K, BLOCK):
            oj = j0 + ar
            sj, rj, real_j = _load_list(s_row, r_row, m_row, oj, K, HAS_MASK)
            dj = tl.zeros([BLOCK], dtype=tl.float32)
            gj = tl.zeros([BLOCK], dtype=tl.float32) + 1.0
            if KIND == LAMBDA or KIND == LIPO or WEIGHTING == WEIGHT_FIRST:
                dj = tl.load(disc_ptr + b * K + oj, mask=oj < K, other=0.0)
                gj = tl.load(gold_ptr + b * K + oj, mask=oj < K, other=1.0)
            both = real_i[:, None] & real_j[None, :]
            win = both & (ri[:, None] > rj[None, :])   # [BLOCK, BLOCK]
            lose = both & (rj[None, :] > ri[:, None])
            w = tl.zeros([BLOCK, BLOCK], dtype=tl.float32) + 1.0
            if KIND == LAMBDA or KIND == LIPO:
                gain_i = tl.exp2(ri) - 1.0
                gain_j = tl.exp2(rj) - 1.0
                w = tl.abs(gain_i[:, None] - gain_j[None, :]) * tl.abs(di[:, None] - dj[None, :])
                if KIND == LAMBDA:
                    w = w * inv_idcg
            if WEIGHTING == WEIGHT_FIRST:
                w = w / (gi[:, None] + gj[None, :])
            x = sigma * (si[:, None] - sj[None, :])
            e = tl.exp(-tl.abs(x))
            softplus_neg_x = tl.maximum(-x, 0.0) + _log1p(e)
            sig_neg_x = tl.where(x < 0.0, 1.0, e) / (1.0 + e)   # sigmoid(-x): i beats j
            sig_pos_x = tl.where(x > 0.0, 1.0, e) / (1.0 + e)   # sigmoid(x): j beats i
            loss_i += tl.sum(tl.where(win, w * softplus_neg_x, 0.0), 1)
            grad_i += tl.sum(tl.where(win, -sigma * w * sig_neg_x, 0.0), 1)
            grad_i += tl.sum(tl.where(lose, sigma * w * sig_pos_x, 0.0), 1)
        tl.store(grad_ptr + b * K + oi, tl.where(keep, grad_i, 0.0), mask=oi < K)
        total += tl.sum(loss_i, 0)
    tl.store(loss_ptr + b, tl.where(keep, total, 0.0))


@triton.jit
def _listwise_listnet_kernel(
    s_ptr, r_ptr, m_ptr, loss_ptr, grad_ptr, K, sigma,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s_row, r_row, m_row = s_ptr + b * K, r_ptr + b * K, m_ptr + b * K
    ar = tl.arange(0, BLOCK)
    smax = -float("inf")
    rmax = -float("inf")
    n_real = 0.0
    for k0 in range(0, K, BLOCK):
        s, r, real = _load_list(s_row, r_row, m_row, k0 + ar, K, HAS_MASK)
        smax = tl.maximum(smax, tl.max(tl.where(real, sigma * s, -float("inf")), 0))
        rmax = tl.maximum(rmax, tl.max(tl.where(real, r, -float("inf")), 0))
        n_real += tl.sum(tl.where(real, 1.0, 0.0), 0)
    keep = n_real >= 2.0
    smax = tl.where(keep, smax, 0.0)  # a list with no real items must not make inf - inf
    rmax = tl.where(keep, rmax, 0.0)
    zs = 0.0
    zr = 0.0
    for k0 in range(0, K, BLOCK):
        s, r, real = _load_list(s_row, r_row, m_row, k0 + ar, K, HAS_MASK)
        zs += tl.sum(tl.where(real, tl.exp(sigma * s - smax), 0.0), 0)
        zr += tl.sum(tl.where(real, tl.exp(r - rmax), 0.0), 0)
    lse = smax + tl.log(tl.where(keep, zs, 1.0))
    zr = tl.where(keep, zr, 1.0)
    total = 0.0
    for k0 in range(0, K, BLOCK):
        offs = k0 + ar
        s, r, real = _load_list(s_row, r_row, m_row, offs, K, HAS_MASK)
        p = tl.exp(r - rmax) / zr
        logq = sigma * s - lse
        total += tl.sum(tl.where(real, -p * logq, 0.0), 0)
        g = tl.where(keep, tl.where(real, sigma * (tl.exp(logq) - p), 0.0), 0.0)
        tl.store(grad_ptr + b * K + offs, g, mask=offs < K)
    tl.store(loss_ptr + b, tl.where(keep, total, 0.0))


@triton.jit
def _listwise_listmle_kernel(
    s_ptr, r_ptr, m_ptr, loss_ptr, grad_ptr, cum_ptr, K, sigma,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s_row, r_row, m_row = s_ptr + b * K, r_ptr + b * K, m_ptr + b * K
    ar = tl.arange(0, BLOCK)
    # pass 1: cum_i = logsumexp of sigma*s_j over real j ranked at or after i
    n_real = 0.0
    total = 0.0
    for i0 in range(0, K, BLOCK):
        oi = i0 + ar
        si, ri, real_i = _load_list(s_row, r_row, m_row, oi, K, HAS_MASK)
        run_max = tl.zeros([BLOCK], dtype=tl.float32) - float("inf")
        run_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for j0 in range(0, K, BLOCK):
            oj = j0 + ar
            sj, rj, real_j = _load_list(s_row, r_row, m_row, oj, K, HAS_MASK)
            tie_after = (rj[None, :] == ri[:, None]) & (oj[None, :] >= oi[:, None])
            after = ((rj[None, :] < ri[:, None]) | tie_after) & real_j[None, :]  # [BLOCK, BLOCK]
            z = tl.where(after, sigma * sj[None, :], -float("inf"))
            new_max = tl.maximum(run_max, tl.max(z, 1))
            safe = tl.where(new_max == -float("inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(z - safe[:, None]), 1)
            run_max = new_max
        cum = tl.where(real_i, run_max + tl.log(run_sum), 0.0)
        tl.store(cum_ptr + b * K + oi, cum, mask=oi < K)
        total += tl.sum(tl.where(real_i, cum - sigma * si, 0.0), 0)
        n_real += tl.sum(tl.where(real_i, 1.0, 0.0), 0)
    tl.debug_barrier()  # pass 2 reads cum of items other threads stored
    keep = n_real >= 2.0
    # pass 2: d/ds_j = sigma * (sum over real i ranked at or before j of exp(sigma*s_j - cum_i) - 1)
    for j0 in range(0, K, BLOCK):
        oj = j0 + ar
        sj, rj, real_j = _load_list(s_row, r_row, m_row, oj, K, HAS_MASK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, K, BLOCK):
            oi = i0 + ar
            _, ri, real_i = _load_list(s_row, r_row, m_row, oi, K, HAS_MASK)
            cum_i = tl.load(cum_ptr + b * K + oi, mask=oi < K, other=0.0)
            tie_before = (ri[None, :] == rj[:, None]) & (oi[None, :] <= oj[:, None])
            before = ((ri[None, :] > rj[:, None]) | tie_before) & real_i[None, :]  # [j, i]
            arg = tl.where(before, sigma * sj[:, None] - cum_i[None, :], -float("inf"))
            acc += tl.sum(tl.exp(arg), 1)
        g = tl.where(keep, tl.where(real_j, sigma * (acc - 1.0), 0.0), 0.0)
        tl.store(grad_ptr + b * K + oj, g, mask=oj < K)
    tl.store(loss_ptr + b, tl.where(keep, total, 0.0))


# fmt: on


def listwise_fwd(
    scores: torch.Tensor,
    relevance: torch.Tensor,
    mask: torch.Tensor | None,
    kind: int,
    weighting: int,
    sigma: float,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the listwise kernel: (loss [B] fp32, d loss / d scores [B, K] fp32).

    ``scores`` and ``relevance`` are contiguous fp32 [B, K]; ``mask`` a bool [B, K] or None;
    ``kind``/``weighting`` the integer codes of fastpref.ops.listwise; ``block`` the tile width
    (a power of two; default: K rounded up to one, clamped to [16, 64]).
    """
    B, K = scores.shape
    loss = torch.empty(B, device=scores.device, dtype=torch.float32)
    grad = torch.empty(B, K, device=scores.device, dtype=torch.float32)
    if B == 0 or K == 0:
        return loss.zero_(), grad
    has_mask = mask is not None
    m = mask.contiguous().view(torch.uint8) if has_mask else scores  # dummy pointer when absent
    if block is None:
        block = min(64, max(16, triton.next_power_of_2(K)))
    grid = (B,)
    if kind in (RANKNET, LAMBDA, LIPO):
        disc = torch.empty(B, K, device=scores.device, dtype=torch.float32)
        gold = torch.empty(B, K, device=scores.device, dtype=torch.float32)
        _listwise_pairwise_kernel[grid](
            scores, relevance, m, loss, grad, disc, gold, K, float(sigma),
            KIND=kind, WEIGHTING=weighting, HAS_MASK=has_mask, BLOCK=block,
        )  # fmt: skip
    elif kind == LISTNET:
        _listwise_listnet_kernel[grid](
            scores, relevance, m, loss, grad, K, float(sigma), HAS_MASK=has_mask, BLOCK=block
        )
    else:
        cum = torch.empty(B, K, device=scores.device, dtype=torch.float32)
        _listwise_listmle_kernel[grid](
            scores, relevance, m, loss, grad, cum, K, float(sigma), HAS_MASK=has_mask, BLOCK=block
        )
    return loss, grad
