"""Fused similarity top-k: each query's k most similar corpus rows, without the B x M scores.

``score(b, j) = queries[b] . corpus[j]`` (cosine with ``normalize``: both sides L2-normalised,
``x / max(|x|, 1e-12)`` as ``F.normalize``), computed in float32 (float64 inputs: a float64
product rounded to float32 once; 16-bit inputs: widened to float32). Per query the candidates are
ranked by descending score, equal scores by ascending corpus index, NaN after every number (NaNs
by index): a total order, so the answer is one exact, deterministic list whatever the backend's
tiling. Hard-negative mining passes each query's positives as ``exclude``.

Layers (STYLE.md): ``similarity_topk_reference`` (materialises B x M and sorts it, stably: the
ground truth); kernels (``_IMPLS``) -- ``chunked`` (PyTorch over corpus blocks,
``_similarity_topk_chunked``), ``cpu`` (``csrc/cpu/similarity_topk.cpp``), ``triton``
(``fastpref.kernels.similarity_topk`` for the block keys, the chunked merge); the ``torch.library``
op ``fastpref::similarity_topk`` (the one exclude check, the kernel call; opaque to
torch.compile); ``BACKENDS`` (name -> implementation, one ``select_backend`` call); the public
function. No autograd: the op returns indices, and its scores carry no gradient.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.constants import accumulation_dtype
from fastpref.ops._dispatch import select_backend
from fastpref.ops._similarity_topk_chunked import (
    CHUNK,
    chunked_topk,
    inverse_norms,
    topk_over_blocks,
)

__all__ = ["SimilarityTopK", "similarity_topk", "similarity_topk_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_CHUNK_BYTES = 256 << 20  # the Triton backend's [B, block] int64 keys buffer


class SimilarityTopK(NamedTuple):
    """The result of ``similarity_topk``; unpacks as ``scores, indices = ...``."""

    scores: Tensor  # [B, k] float32, descending (NaN after numbers; -inf where index is -1)
    indices: Tensor  # [B, k] int64 corpus rows; -1 pads a row left with fewer than k candidates


# ----------------------------------------------------------------------------------------------
# checks


def _as_k(k) -> int:
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise TypeError(f"similarity_topk: k must be an int, got {k!r}")
    return operator.index(k)


def _check(queries: Tensor, corpus: Tensor, k: int, exclude: Tensor | None) -> None:
    """Checks that need no tensor data (so they also run under torch.compile)."""
    for name, x in (("queries", queries), ("corpus", corpus)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"similarity_topk: {name} must be a 2-D tensor, got {got}")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"similarity_topk: queries {tuple(queries.shape)} and corpus {tuple(corpus.shape)} "
            "must have the same D"
        )
    if queries.dtype != corpus.dtype or queries.dtype not in _DTYPES:
        raise TypeError(
            f"similarity_topk: queries and corpus must share a floating dtype; got queries "
            f"{queries.dtype} and corpus {corpus.dtype}"
        )
    if queries.device != corpus.device:
        raise ValueError(
            f"similarity_topk: queries is on {queries.device} but corpus is on {corpus.device}"
        )
    M = corpus.shape[0]
    if k < 1:
        raise ValueError(f"similarity_topk: k must be >= 1, got k={k}")
    if k > M:
        raise ValueError(f"similarity_topk: k={k} is more than the corpus has (M={M} rows)")
    if exclude is None:
        return
    B = queries.shape[0]
    if not isinstance(exclude, Tensor) or exclude.dim() != 2 or exclude.shape[0] != B:
        got = tuple(exclude.shape) if isinstance(exclude, Tensor) else type(exclude).__name__
        raise ValueError(f"similarity_topk: exclude must be [B, P] = [{B}, P] (-1 pads), got {got}")
    if exclude.dtype == torch.bool or exclude.is_floating_point() or exclude.is_complex():
        raise TypeError(f"similarity_topk: exclude must be an integer tensor, got {exclude.dtype}")
    if exclude.device != queries.device:
        raise ValueError(
            f"similarity_topk: exclude is on {exclude.device} but queries is on {queries.device}"
        )


def check_exclude(exclude: Tensor | None, M: int) -> None:
    """ValueError naming the first ``exclude[b, p]`` outside ``[0, M)`` that is not -1.

    The one value scan of ``exclude``; every backend trusts it afterwards (and addresses only
    the entries it found in range)."""
    if exclude is None or exclude.numel() == 0:
        return
    bad = (exclude < -1) | (exclude >= M)
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"similarity_topk: exclude[{b}, {p}] = {int(exclude[b, p])} is outside [0, M={M}) "
            "and is not the padding -1"
        )


# ----------------------------------------------------------------------------------------------
# reference


def _materialised(
    queries: Tensor, corpus: Tensor, k: int, exclude: Tensor | None, normalize: bool
) -> tuple[Tensor, Tensor]:
    """The B x M scores, ranked by two stable sorts: by score, then by class (number, NaN,
    excluded), so equal scores and the NaNs keep their index order."""
    acc = accumulation_dtype(queries.dtype)
    q, c = queries.detach().to(acc), corpus.detach().to(acc)
    if normalize:
        q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    s = (q @ c.T).float()  # [B, M]
    cls = s.isnan().to(torch.int8)  # 0 = a number, 1 = NaN, 2 = excluded
    if exclude is not None and exclude.numel():
        rows, cols = (exclude >= 0).nonzero(as_tuple=True)
        cls[rows, exclude[rows, cols]] = 2
    by_score = torch.where(cls == 0, s, float("-inf")).sort(dim=1, descending=True, stable=True)
    by_class = cls.gather(1, by_score.indices).sort(dim=1, stable=True)
    order = by_score.indices.gather(1, by_class.indices)[:, :k]  # [B, k]
    dropped = by_class.values[:, :k] == 2
    scores = s.gather(1, order).masked_fill(dropped, float("-inf"))
    return scores, order.masked_fill(dropped, -1)


def similarity_topk_reference(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    normalize: bool = False,
) -> SimilarityTopK:
    """``similarity_topk`` in plain PyTorch; materialises the B x M scores (tests only)."""
    k = _as_k(k)
    _check(queries, corpus, k, exclude)
    exclude = None if exclude is None else exclude.long()
    check_exclude(exclude, corpus.shape[0])
    return SimilarityTopK(*_materialised(queries, corpus, k, exclude, normalize))


# ----------------------------------------------------------------------------------------------
# kernels behind the registered op: (queries, corpus, k, exclude, normalize) -> (scores, indices)


def _cpu(queries, corpus, k, exclude, normalize):
    return torch.ops.fastpref_C.similarity_topk(queries, corpus, k, exclude, normalize)


def _triton(queries, corpus, k, exclude, normalize):
    if queries.dtype == torch.float64:  # tl.dot has no float64
        return chunked_topk(queries, corpus, k, exclude, normalize)
    from fastpref.kernels.similarity_topk import similarity_topk_keys

    q = F.normalize(queries.float(), dim=-1) if normalize else queries
    inv = inverse_norms(corpus, torch.float32) if normalize else None
    B, M = queries.shape[0], corpus.shape[0]
    chunk = max(CHUNK, _TRITON_CHUNK_BYTES // (8 * max(B, 1)) // 64 * 64)
    block = lambda start, stop: similarity_topk_keys(q, corpus, start, stop, inv)
    return topk_over_blocks(block, B, M, k, exclude, chunk, queries.device)


_IMPLS = {"chunked": chunked_topk, "cpu": _cpu, "triton": _triton}


@torch.library.custom_op("fastpref::similarity_topk", mutates_args=())
def _topk_op(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    exclude: Tensor | None,
    normalize: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(scores [B, k] float32, indices [B, k] int64) of the kernel ``_IMPLS[backend]``."""
    check_exclude(exclude, corpus.shape[0])
    B = queries.shape[0]
    if B == 0:
        return queries.new_empty((0, k), dtype=torch.float32), queries.new_empty(
            (0, k), dtype=torch.int64
        )
    scores, indices = _IMPLS[backend](queries, corpus, k, exclude, normalize)
    return scores.float(), indices.long()


@_topk_op.register_fake
def _(queries, corpus, k, exclude, normalize, backend):
    B = queries.shape[0]
    return (
        queries.new_empty((B, k), dtype=torch.float32),
        queries.new_empty((B, k), dtype=torch.int64),
    )


def _fused(queries, corpus, k, exclude, normalize, backend):
    return _topk_op(queries, corpus, k, exclude, normalize, backend)


def _reference(queries, corpus, k, exclude, normalize, backend):
    check_exclude(exclude, corpus.shape[0])
    return _materialised(queries, corpus, k, exclude, normalize)


BACKENDS = {"reference": _reference, **dict.fromkeys(_IMPLS, _fused)}


# ----------------------------------------------------------------------------------------------
# public API


def similarity_topk(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    normalize: bool = False,
    backend: str | None = None,
) -> SimilarityTopK:
    r"""The ``k`` corpus rows most similar to each query: ``(scores, indices)``, both ``[B, k]``.

    ``score(b, j) = q_b . c_j`` (cosine when ``normalize``). Equals
    ``torch.sort(q @ C.T, dim=1, descending=True, stable=True)[:, :k]`` (NaN moved after the
    numbers, excluded entries removed) without allocating the B x M scores: the corpus is scored
    one tile at a time and merged into a running top k per query; extra memory is a tile per
    thread plus O(B·k) (the C++ kernel: 512 x 256 x 4 bytes per thread and B·2k int64 keys).
    Rows are ranked by descending score, equal scores by ascending corpus index, NaN last.

    Args:
        queries: ``[B, D]`` float32 / bfloat16 / float16 / float64.
        corpus: ``[M, D]``, same dtype and device.
        k: ``1 <= k <= M`` (ValueError naming k and M otherwise).
        exclude: optional ``[B, P]`` integer corpus indices that query b must not get (e.g. its
            own positives, for hard-negative mining); ``-1`` pads rows with fewer than P;
            anything else outside ``[0, M)`` is a ValueError naming the position. A row left
            with fewer than k candidates is padded with index -1 and score -inf.
        normalize: cosine similarity (L2-normalise both sides) instead of the dot product.
        backend: "reference" | "chunked" | "cpu" | "triton"; default by device (env
            ``FASTPREF_BACKEND`` overrides).

    Returns:
        ``SimilarityTopK(scores, indices)``; the scores carry no gradient.
    """
    k = _as_k(k)
    _check(queries, corpus, k, exclude)
    chosen = select_backend("similarity_topk", queries.device, backend, BACKENDS)
    ex = None if exclude is None else exclude.detach().long().contiguous()
    scores, indices = BACKENDS[chosen](
        queries.detach(), corpus.detach(), k, ex, bool(normalize), chosen
    )
    return SimilarityTopK(scores, indices)
