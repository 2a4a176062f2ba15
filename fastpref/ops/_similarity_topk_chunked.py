"""Chunked PyTorch backend of ``similarity_topk``, and the merge the Triton backend shares.

The corpus is cut into blocks of ``CHUNK`` rows; each block's ``[B, CHUNK]`` scores become int64
keys that encode the ranking order (below) and are merged into the running ``[B, k]`` best keys
with one ``torch.topk``. Extra memory: a few ``[B, CHUNK + k]`` tensors, never ``B x M``.

The key of a candidate, the same as the C++ kernel's (csrc/include/fastpref/similarity_topk_math.h):
``sortable(score) * 2^32 + (2^32 - 1 - index)``, ``sortable`` mapping float32 to int32 in the
same order (NaN below -inf, -0 as +0). So "better" is ``>`` on keys: descending score, ascending
index among equal scores, NaN after every number; distinct candidates have distinct keys, hence
one exact, deterministic top k whatever the block size. ``NO_KEY`` (int64 min) marks an excluded
candidate and decodes to (score -inf, index -1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.constants import accumulation_dtype

CHUNK = 2048  # corpus rows per block: [B, 2048] GEMMs stay large, memory O(B * (CHUNK + k))
NORM_EPS = 1e-12  # F.normalize's
NO_KEY = -(2**63)
_LOW = 2**32 - 1


def pack_keys(scores: Tensor, start: int) -> Tensor:
    """int64 keys of the float32 ``scores[B, C]`` of corpus rows ``start .. start + C - 1``."""
    s = torch.where(scores == 0, 0.0, scores.float())  # -0 ties with +0
    b = s.view(torch.int32)
    o = torch.where(b < 0, b ^ 0x7FFFFFFF, b)
    o = torch.where(s.isnan(), -(2**31), o)
    index = torch.arange(start, start + s.shape[1], device=s.device)
    return o.to(torch.int64) * 2**32 + (_LOW - index)


def unpack_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(scores float32, indices int64) of ``keys``; ``NO_KEY`` gives (-inf, -1)."""
    low = keys & _LOW
    o = torch.div(keys - low, 2**32, rounding_mode="floor").to(torch.int32)  # exact
    scores = torch.where(o < 0, o ^ 0x7FFFFFFF, o).view(torch.float32)  # int32 min -> NaN
    none = keys == NO_KEY
    return scores.masked_fill(none, float("-inf")), (_LOW - low).masked_fill(none, -1)


def exclude_(keys: Tensor, exclude: Tensor, start: int) -> None:
    """Set the keys of the excluded candidates among corpus rows ``start ..`` to ``NO_KEY``."""
    hit = (exclude >= start) & (exclude < start + keys.shape[1])
    rows, cols = hit.nonzero(as_tuple=True)
    keys[rows, exclude[rows, cols] - start] = NO_KEY  # in range: only hits are addressed


def topk_over_blocks(
    block_keys: Callable[[int, int], Tensor],
    B: int,
    M: int,
    k: int,
    exclude: Tensor | None,
    chunk: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Merge ``block_keys(start, stop)`` ([B, stop - start] int64) over the corpus: the top k."""
    best = torch.empty((B, 0), dtype=torch.int64, device=device)  # [B, <= k], descending
    for start in range(0, M, chunk):
        keys = block_keys(start, min(M, start + chunk))
        if exclude is not None and exclude.numel():
            exclude_(keys, exclude, start)
        candidates = torch.cat([best, keys], dim=1)
        best = candidates.topk(min(k, candidates.shape[1]), dim=1).values
    return unpack_keys(best)


def inverse_norms(corpus: Tensor, acc: torch.dtype, step: int = 4096) -> Tensor:
    """``1 / max(|c_j|, eps)`` per corpus row in ``acc``, widening ``step`` rows at a time."""
    out = torch.empty(corpus.shape[0], dtype=acc, device=corpus.device)
    for a in range(0, corpus.shape[0], step):
        rows = corpus[a : a + step].to(acc)
        out[a : a + step] = torch.linalg.vector_norm(rows, dim=1).clamp_min(NORM_EPS).reciprocal()
    return out


def chunked_topk(
    queries: Tensor, corpus: Tensor, k: int, exclude: Tensor | None, normalize: bool
) -> tuple[Tensor, Tensor]:
    """(scores [B, k] float32, indices [B, k] int64); exclude already checked."""
    acc = accumulation_dtype(queries.dtype)
    q = queries.to(acc)
    if normalize:
        q = F.normalize(q, dim=-1)

    def block(start: int, stop: int) -> Tensor:
        c = corpus[start:stop].to(acc)
        s = q @ c.T  # [B, stop - start]
        if normalize:
            s = s * torch.linalg.vector_norm(c, dim=1).clamp_min(NORM_EPS).reciprocal()
        return pack_keys(s.float(), start)

    return topk_over_blocks(block, q.shape[0], corpus.shape[0], k, exclude, CHUNK, q.device)
