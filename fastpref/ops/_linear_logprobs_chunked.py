"""Chunked PyTorch backend of ``linear_logprobs``: bounded memory, portable, torch.compile-able.

The same algorithm as the C++ and Triton kernels, written with plain tensor ops: the vocabulary
is cut into chunks of ``CHUNK`` columns; the forward keeps a running log-sum-exp (and entropy)
per row, the backward recomputes each chunk's logits and turns them straight into the logit
gradient, ``dH``, ``dW`` and ``db``. Extra memory: a few ``[N, CHUNK]`` float32 tiles, never the
``N x V`` logits. Rows arrive compacted (no ignored targets; every target in ``[0, V)``).

Logits: ``f = softcap * tanh((h @ W.T + b) / softcap) / temperature`` (softcap optional).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpref.constants import accumulation_dtype

CHUNK = 4096  # vocab columns per chunk: [N, 4096] fp32 tiles keep the GEMMs large on any device


def _map_logits(
    z: Tensor, temperature: float, softcap: float | None
) -> tuple[Tensor, Tensor | None]:
    """f and, with a softcap, the tanh needed for df/dz = (1 - tanh^2) / temperature."""
    if softcap is None:
        return z / temperature, None
    t = torch.tanh(z / softcap)
    return t * (softcap / temperature), t


def _chunk_logits(h: Tensor, w: Tensor, bias: Tensor | None, acc: torch.dtype) -> Tensor:
    z = (h @ w.T).to(acc)  # [N, C]; bf16 GEMMs accumulate in fp32, round once
    if bias is not None:
        z = z + bias.to(acc)
    return z


def chunked_fwd(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp[N], lse[N], entropy[N] or None) in the accumulation dtype."""
    acc = accumulation_dtype(hidden.dtype)
    N, V = hidden.shape[0], weight.shape[0]
    lse = hidden.new_full((N,), float("-inf"), dtype=acc)
    ent = hidden.new_zeros((N,), dtype=acc) if with_entropy else None
    tgt = hidden.new_zeros((N,), dtype=acc)
    for v0 in range(0, V, CHUNK):
        v1 = min(v0 + CHUNK, V)
        f, _ = _map_logits(
            _chunk_logits(hidden, weight[v0:v1], None if bias is None else bias[v0:v1], acc),
            temperature,
            softcap,
        )
        hit = targets[:, None] == torch.arange(v0, v1, device=hidden.device)[None, :]
        tgt = tgt + torch.where(hit, f, 0.0).sum(1)
        c = torch.logsumexp(f, dim=1)  # [N] this chunk's log-sum-exp
        if ent is not None:
            # entropy of the chunk's own softmax q, then merged: H = sum_k w_k (H_k - log w_k)
            logq = f - c[:, None]
            q = logq.exp()
            hk = -torch.where(q > 0, q * logq, 0.0).sum(1)
            if v0 == 0:
                ent = hk
            else:
                new = torch.logaddexp(lse, c)
                w_old, w_new = (lse - new).exp(), (c - new).exp()
                ent = w_old * ent + w_new * hk - (w_old * (lse - new) + w_new * (c - new))
        lse = c if v0 == 0 else torch.logaddexp(lse, c)
    # NaN/inf anywhere in a row (or an all -inf row) leaves that row undefined: NaN, not +-inf
    lse = torch.where(torch.isfinite(lse), lse, float("nan"))
    return tgt - lse, lse, ent


def chunked_bwd(
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor | None,
    temperature: float,
    softcap: float | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dH, dW, db) for upstream gradients of logp and/or entropy; None where not needed.

    With p = softmax(f): d logp / d f = onehot - p and d entropy / d f = -p (f - E_p f),
    E_p f = lse - entropy; chained through df/dz. dH and db accumulate in fp32 (fp64).
    """
    acc = accumulation_dtype(hidden.dtype)
    N, V = hidden.shape[0], weight.shape[0]
    g = grad_logp.to(acc) if grad_logp is not None else hidden.new_zeros((N,), dtype=acc)
    dh = hidden.new_zeros(hidden.shape, dtype=acc) if need_hidden else None
    dw = torch.empty_like(weight) if need_weight else None
    db = hidden.new_zeros((V,), dtype=acc) if need_bias else None
    ef = None if grad_entropy is None else (lse - entropy).to(acc)
    for v0 in range(0, V, CHUNK):
        v1 = min(v0 + CHUNK, V)
        w = weight[v0:v1]
        f, t = _map_logits(
            _chunk_logits(hidden, w, None if bias is None else bias[v0:v1], acc),
            temperature,
            softcap,
        )
        p = (f - lse[:, None]).exp()  # [N, C]
        gf = -g[:, None] * p
        if grad_entropy is not None:
            gf = gf - torch.where(p > 0, grad_entropy.to(acc)[:, None] * p * (f - ef[:, None]), 0.0)
        hit = targets[:, None] == torch.arange(v0, v1, device=hidden.device)[None, :]
        gf = torch.where(hit, gf + g[:, None], gf)
        gz = gf / temperature if t is None else gf * (1 - t * t) / temperature
        gz_in = gz.to(hidden.dtype)
        if dh is not None:
            dh = dh + (gz_in @ w).to(acc)
        if dw is not None:
            dw[v0:v1] = gz_in.T @ hidden
        if db is not None:
            db[v0:v1] = gz.sum(0)
    return (None if dh is None else dh.to(hidden.dtype)), dw, db
