"""Fused listwise ranking losses: RankNet (+ FIRST weights), LambdaRank, ListNet, ListMLE, LiPO-λ.

One list = K items with ``scores`` (the model's, differentiable) and ``relevance`` (graded labels,
higher is better); ``mask`` marks the real items of ragged lists. With x_ij = sigma·(s_i − s_j)
and pairs = ordered pairs of real items with relevance_i > relevance_j (ties form no pair):

* ``ranknet``  Σ_pairs softplus(−x_ij)                                    (Burges et al. 2005)
* ``lambda``   Σ_pairs |ΔNDCG_ij|·softplus(−x_ij),              (Burges 2010, MSR-TR-2010-82)
  |ΔNDCG_ij| = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)| / IDCG
* ``lipo``     Σ_pairs Δ_ij·softplus(−x_ij),  Δ_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|
  (LiPO-λ, https://arxiv.org/abs/2402.01878 eq. 6): the same weights as ``lambda`` WITHOUT the
  1/IDCG normalisation, i.e. the paper's Δ as written; so ``lipo`` = IDCG · ``lambda`` per list.
* ``listnet``  −Σ_i softmax(relevance)_i · log_softmax(sigma·s)_i          (Cao et al. 2007)
* ``listmle``  Σ_k [logsumexp_{l≥k} sigma·s_π(l) − sigma·s_π(k)], π = order by relevance
  (Xia et al. 2008), via a reverse logcumsumexp.

G = 2^relevance − 1, D(t) = log2(1 + t), τ = 1-based rank by the current score (descending;
equal scores keep index order), IDCG = Σ_i G_i / D(π_i) with π the 1-based rank by relevance
(descending, index order among ties); a list with IDCG ≤ 0 has ``lambda`` weights 0. Pair weights
are detached. ``weighting="first"`` multiplies every pair weight by FIRST's 1/(ρ_i + ρ_j)
(https://arxiv.org/abs/2406.15657), ρ = 1-based gold rank 1 + #{real j: relevance_j >
relevance_i} (tied items share a rank); it applies to the pairwise kinds only. ListMLE breaks
relevance ties by index. ``sigma`` scales the scores in every kind (for ``listnet``/``listmle``
it is an inverse temperature). Values are per-list SUMS (FIRST's code averages its weighted pairs:
divide by the number of pairs to reproduce it). Lists with fewer than two real items give 0 and
zero gradient. Gradients flow to ``scores`` only.

Backends: ``reference`` (plain PyTorch, materialises B×K×K: the ground truth), ``chunked`` (the
reference on row blocks, bounded memory), ``cpu`` (C++, csrc/cpu/listwise.cpp), ``cuda``
(csrc/cuda/listwise.cu, K ≤ ``CUDA_MAX_K``), ``triton`` (fastpref/kernels/listwise.py). The fused
backends compute the loss and d loss/d scores in one pass and save that [B, K] gradient for
backward: the pair loop is O(K²) transcendental work, so recomputing it would double the cost,
while the saved gradient is no bigger than ``scores`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.constants import accumulation_dtype
from fastpref.ops._dispatch import select_backend

KINDS = {"ranknet": 0, "lambda": 1, "listnet": 2, "listmle": 3, "lipo": 4}  # = listwise_math.h
PAIRWISE_KINDS = ("ranknet", "lambda", "lipo")
WEIGHTINGS = {None: 0, "first": 1}
CUDA_MAX_K = 1024  # one CUDA block per list, one thread per item
CHUNK_PAIRS = 1 << 20  # the chunked backend materialises at most this many pairs at a time


@dataclass(frozen=True)
class ListwiseParams:
    """The non-tensor options of one call."""

    kind: str
    weighting: str | None = None
    sigma: float = 1.0
    backend: str = "reference"  # a resolved backend name (never None)


def _check(scores: Tensor, relevance: Tensor, mask: Tensor | None, p: ListwiseParams) -> None:
    """Checks that need no tensor data (so they also run under torch.compile)."""
    if p.kind not in KINDS:
        raise ValueError(f"listwise_loss: unknown kind={p.kind!r}; choose one of {tuple(KINDS)}")
    if p.weighting not in WEIGHTINGS:
        raise ValueError(
            f"listwise_loss: unknown weighting={p.weighting!r}; choose None or 'first'"
        )
    if p.weighting is not None and p.kind not in PAIRWISE_KINDS:
        raise ValueError(
            f"listwise_loss: weighting={p.weighting!r} applies to the pairwise kinds "
            f"{PAIRWISE_KINDS}, not kind={p.kind!r}"
        )
    if not p.sigma > 0:
        raise ValueError(f"listwise_loss: sigma must be positive, got sigma={p.sigma}")
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        kind = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
        raise TypeError(f"listwise_loss: scores must be a floating-point tensor, got {kind}")
    if scores.dim() != 2:
        raise ValueError(f"listwise_loss: scores must be [B, K], got shape {tuple(scores.shape)}")
    if not isinstance(relevance, Tensor) or relevance.shape != scores.shape:
        got = tuple(relevance.shape) if isinstance(relevance, Tensor) else type(relevance).__name__
        raise ValueError(
            f"listwise_loss: relevance must have the shape of scores {tuple(scores.shape)}, "
            f"got {got}"
        )
    if relevance.dtype == torch.bool or relevance.is_complex():
        raise TypeError(f"listwise_loss: relevance must be real numbers, got {relevance.dtype}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != scores.shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"listwise_loss: mask must have the shape of scores {tuple(scores.shape)}, got {got}"
        )


def _check_relevance_values(relevance: Tensor, mask: Tensor | None) -> None:
    """NaN/inf in the relevance of a real item: an error, on CUDA without a host sync."""
    bad = ~torch.isfinite(relevance)
    if mask is not None:
        bad = bad & mask
    msg = "listwise_loss: relevance has NaN or inf entries at real (unmasked) items"
    if relevance.device.type == "cuda":
        torch._assert_async(~bad.any(), msg)
    elif bool(bad.any()):
        raise ValueError(msg)


def _check_cuda_limit(K: int) -> None:
    if K > CUDA_MAX_K:
        raise ValueError(
            f"listwise_loss: scores has K={K} items per list, beyond the CUDA kernel's limit "
            f"of {CUDA_MAX_K} (one thread per item); use backend='triton'"
        )


def _as_mask(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else (mask if mask.dtype == torch.bool else mask != 0)


def listwise_loss_reference(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    *,
    kind: str,
    weighting: str | None = None,
    sigma: float = 1.0,
) -> Tensor:
    """Plain PyTorch listwise losses, materialising the B×K×K pair tensors (ground truth).

    Arithmetic on scores runs in ``scores.dtype`` (so a bf16 call shows bf16 rounding); the
    relevance-derived weights in float32 (float64 for float64 scores). Returns float32 [B]
    (float64 for float64 scores). Differentiable in ``scores`` through plain autograd.
    """
    p = ListwiseParams(kind, weighting, float(sigma))
    _check(scores, relevance, mask, p)
    mask = _as_mask(mask)
    _check_relevance_values(relevance, mask)
    B, K = scores.shape
    wdt = accumulation_dtype(scores.dtype)
    rel = relevance.detach().to(wdt)
    real = torch.ones_like(rel, dtype=torch.bool) if mask is None else mask
    real = real & (real.sum(-1, keepdim=True) >= 2)  # lists with < 2 real items: no term at all
    # Padding may hold any relevance (NaN too): 0 there, or NaN gains would reach the gradient
    # through the pair weights of pairs that `where` drops (0 * NaN in the backward).
    rel = rel.masked_fill(~real, 0)
    z = scores * p.sigma  # [B, K]
    fill = torch.finfo(z.dtype).min  # exp(fill - anything finite) == 0, and no -inf - -inf NaN
    out = accumulation_dtype(scores.dtype)
    if kind == "listnet":
        logq = torch.log_softmax(z.masked_fill(~real, fill), -1)
        target = torch.softmax(rel.masked_fill(~real, torch.finfo(wdt).min), -1)
        return -(target.to(z.dtype) * logq).where(real, 0).sum(-1).to(out)
    if kind == "listmle":
        order = torch.sort(rel.masked_fill(~real, -torch.inf), dim=-1, descending=True, stable=True)
        real_sorted = real.gather(-1, order.indices)
        zs = z.gather(-1, order.indices).masked_fill(~real_sorted, fill)
        cum = torch.logcumsumexp(zs.flip(-1), -1).flip(-1)  # cum[k] = logsumexp(zs[k:])
        return (cum - zs).where(real_sorted, 0).sum(-1).to(out)
    pairs = real[:, :, None] & real[:, None, :] & (rel[:, :, None] > rel[:, None, :])  # [B,K,K]
    w = torch.ones_like(rel[:, :, None] * rel[:, None, :])  # [B, K, K]
    if kind in ("lambda", "lipo"):
        gain = torch.exp2(rel) - 1
        inv_disc = 1.0 / torch.log2(1.0 + _stable_rank_desc(scores.detach().to(wdt), real))
        w = (gain[:, :, None] - gain[:, None, :]).abs()
        w = w * (inv_disc[:, :, None] - inv_disc[:, None, :]).abs()
        if kind == "lambda":
            ideal = gain / torch.log2(1.0 + _stable_rank_desc(rel, real))
            idcg = ideal.where(real, 0).sum(-1)
            w = w * torch.where(idcg > 0, 1.0 / idcg, 0.0)[:, None, None]
    if weighting == "first":
        beats = real[:, None, :] & (rel[:, None, :] > rel[:, :, None])  # [b, i, j]: j above i
        gold = 1.0 + beats.sum(-1).to(wdt)
        w = w / (gold[:, :, None] + gold[:, None, :])
    x = z[:, :, None] - z[:, None, :]  # [B, K, K]
    terms = w.to(z.dtype) * F.softplus(-x)
    return terms.where(pairs, 0).sum((1, 2)).to(out)


def _stable_rank_desc(v: Tensor, real: Tensor) -> Tensor:
    """1-based rank of each real item by v descending, index order among equal values."""
    K = v.shape[-1]
    idx = torch.arange(K, device=v.device)
    vi, vj = v[:, :, None], v[:, None, :]
    ahead = (vj > vi) | ((vj == vi) & (idx[None, :] < idx[:, None]))  # [b, i, j]: j before i
    return 1.0 + (ahead & real[:, None, :]).sum(-1).to(v.dtype)


def _chunked_forward(scores: Tensor, rel: Tensor, mask: Tensor | None, p: ListwiseParams):
    """The reference on row blocks of ≤ CHUNK_PAIRS pairs: loss and d loss/d scores."""
    B, K = scores.shape
    rows = max(1, CHUNK_PAIRS // max(1, K * K))
    loss = scores.new_empty(B)
    grad = torch.empty_like(scores)
    for a in range(0, B, rows):
        with torch.enable_grad():
            s = scores[a : a + rows].detach().requires_grad_(True)
            m = None if mask is None else mask[a : a + rows]
            out = listwise_loss_reference(
                s, rel[a : a + rows], m, kind=p.kind, weighting=p.weighting, sigma=p.sigma
            )
            (g,) = torch.autograd.grad(out.sum(), s)
        loss[a : a + rows] = out.detach()
        grad[a : a + rows] = g
    return loss, grad


class _ChunkedListwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, relevance: Tensor, mask: Tensor | None, p: ListwiseParams):
        acc = accumulation_dtype(scores.dtype)
        loss, grad = _chunked_forward(scores.detach().to(acc), relevance.to(acc), mask, p)
        ctx.save_for_backward(grad)
        ctx.scores_dtype = scores.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad_loss[:, None] * grad).to(ctx.scores_dtype), None, None, None


# ----------------------------------------------------------------------------------------------
# fused kernels behind the registered op: (scores, relevance, mask, kind, weighting, sigma) ->
# (loss[B], d loss/d scores [B, K]) in the accumulation dtype


def _native_fwd(s, r, m, kind, weighting, sigma):  # csrc/cpu/listwise.cpp, csrc/cuda/listwise.cu
    return torch.ops.fastpref_C.listwise_fwd(s, r, m, kind, weighting, sigma)


def _itemwise_fwd(s, r, m, kind, weighting, sigma):  # tests: the CUDA schedule, on the CPU
    return torch.ops.fastpref_C.listwise_fwd_itemwise(s, r, m, kind, weighting, sigma)


def _triton_fwd(s, r, m, kind, weighting, sigma):
    from fastpref.kernels.listwise import listwise_fwd

    loss, grad = listwise_fwd(s.float(), r.float(), m, kind, weighting, sigma)
    return loss.to(s.dtype), grad.to(s.dtype)


_IMPLS = {"cpu": _native_fwd, "cuda": _native_fwd, "triton": _triton_fwd, "itemwise": _itemwise_fwd}
_CHECKS_RELEVANCE = ("cpu", "itemwise")  # the C++ CPU kernel checks relevance while it reads it


@torch.library.custom_op("fastpref::listwise_fwd", mutates_args=(), device_types=None)
def _listwise_fwd(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None,
    kind: int,
    weighting: int,
    sigma: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Fused forward: (loss[B], d loss/d scores [B, K]) in float32 (float64 for float64 scores)."""
    if backend not in _IMPLS:
        raise ValueError(f"listwise_loss: backend {backend!r} has no fused forward")
    if backend not in _CHECKS_RELEVANCE:
        _check_relevance_values(relevance, mask)
    acc = accumulation_dtype(scores.dtype)
    s = scores.to(acc).contiguous()
    r = relevance.to(acc).contiguous()
    m = None if mask is None else mask.contiguous()
    return _IMPLS[backend](s, r, m, kind, weighting, sigma)


@_listwise_fwd.register_fake
def _(scores, relevance, mask, kind, weighting, sigma, backend):
    acc = accumulation_dtype(scores.dtype)
    B, K = scores.shape
    return scores.new_empty((B,), dtype=acc), scores.new_empty((B, K), dtype=acc)


def _setup_context(ctx, inputs, output):
    ctx.scores_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no [B, K] zeros for the gradient output's own gradient


def _backward(ctx, grad_loss: Tensor | None, _grad_of_grad: Tensor | None):
    (grad,) = ctx.saved_tensors
    d_scores = None if grad_loss is None else (grad_loss[:, None] * grad).to(ctx.scores_dtype)
    return d_scores, None, None, None, None, None, None  # one per input; only scores has one


_listwise_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# backends: name -> (scores, relevance, mask, params) -> loss [B]


def _materialised(scores: Tensor, relevance: Tensor, mask: Tensor | None, p: ListwiseParams):
    return listwise_loss_reference(
        scores, relevance, mask, kind=p.kind, weighting=p.weighting, sigma=p.sigma
    )


def _chunked(scores: Tensor, relevance: Tensor, mask: Tensor | None, p: ListwiseParams):
    _check_relevance_values(relevance, mask)
    return _ChunkedListwise.apply(scores, relevance, mask, p)


def _fused(scores: Tensor, relevance: Tensor, mask: Tensor | None, p: ListwiseParams):
    """The kernels ``_IMPLS[p.backend]`` through the registered op."""
    if p.backend == "cuda":
        _check_cuda_limit(scores.shape[1])
    codes = (KINDS[p.kind], WEIGHTINGS[p.weighting], p.sigma)
    return _listwise_fwd(scores, relevance, mask, *codes, p.backend)[0]


BACKENDS = {
    "reference": _materialised,
    "chunked": _chunked,
    **dict.fromkeys(("cpu", "triton", "cuda"), _fused),
}


def listwise_loss(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    *,
    kind: str,
    weighting: str | None = None,
    sigma: float = 1.0,
    backend: str | None = None,
) -> Tensor:
    """Per-list listwise ranking loss [B] (float32; float64 for float64 scores), fused.

    ``kind`` is one of ranknet | lambda | listnet | listmle | lipo and ``weighting`` None or
    "first" (pairwise kinds); the formulas, tie and mask rules are in this module's docstring.
    Equals ``listwise_loss_reference`` (e.g. for ranknet
    ``(F.softplus(-sigma*(s[:,:,None]-s[:,None,:])) * (r[:,:,None] > r[:,None,:])).sum((1,2))``)
    without allocating the B×K×K pair tensor: extra memory is the [B, K] gradient plus O(K)
    per thread. Worked example (ranknet, sigma=1): s=[0, 0], r=[1, 0] gives one pair,
    softplus(0) = ln 2 ≈ 0.6931, and d/ds = [−1/2, +1/2].
    """
    p = ListwiseParams(kind, weighting, float(sigma))
    _check(scores, relevance, mask, p)
    p = replace(p, backend=select_backend("listwise_loss", scores.device, backend, BACKENDS))
    return BACKENDS[p.backend](scores, relevance, _as_mask(mask), p)
