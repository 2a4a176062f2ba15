"""Retrieval for the embedding family: encode texts with the model, rank a corpus, and score the
ranking with trec_eval's definitions (``pytrec_eval``).

    emb = encode(model, seqs, pad_id, batch_size=64, dist=dist)   # [N, D], every rank
    scores, idx = similarity_topk(q, corpus, k=100, exclude=ex)     # [B, k] best first
    metrics = retrieval_metrics(scores, idx, relevant)             # recall@1/@10, MRR@10, nDCG@10

``similarity_topk`` is fastpref's fused op when the build has one (``fastpref.similarity_topk``),
else :func:`chunked_topk` — a ``torch.topk`` over corpus blocks of ``block`` rows, so memory is
O(B·(k + block)) rather than B×N; the order is deterministic (score, then corpus index).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastpref.data.ir import MRR_AT_10, evaluate_rankings
from fastpref.families.base import Dist, gather_objects, rank_slices
from fastpref.families.embedding_formats import pad

__all__ = ["RANK_DEPTH", "chunked_topk", "encode", "retrieval_metrics", "similarity_topk"]

RANK_DEPTH = 100  # documents ranked per query (the @10 metrics need 10; recall/nDCG use all 100)


@torch.no_grad()
def encode(
    model, seqs: Sequence[list[int]], pad_id: int, *, batch_size: int, dist: Dist, chunk: int = 0
) -> Tensor:
    """``[len(seqs), D]`` float32 CPU embeddings of token-id sequences, on every rank.

    Sequences are batched by length (less padding) and shared over the ranks; every rank runs
    the same number of forwards (ZeRO-3 gathers collectively)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    parts: list[tuple[list[int], Tensor]] = []
    for idx, weight in rank_slices(len(order), batch_size, dist):
        rows = [order[i] for i in idx]
        ids, mask = pad([seqs[r] for r in rows], pad_id)
        emb = model(ids.to(dist.device), mask.to(dist.device), chunk).float().cpu()
        if weight:
            parts.append((rows, emb))
    out: Tensor | None = None
    for rank_parts in gather_objects(parts, dist):
        for rows, emb in rank_parts:
            if out is None:
                out = torch.empty(len(seqs), emb.shape[1])
            out[rows] = emb
    assert out is not None, "encode() needs at least one sequence"
    return out


def chunked_topk(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    normalize: bool = False,
    block: int = 4096,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` corpus rows by dot product (cosine with ``normalize``) for each query.

    Returns ``(scores [B, k'], indices [B, k'])``, k' = min(k, N), best first, ties broken by the
    lower corpus index. ``exclude``: ``[B, E]`` corpus indices each query must not get (−1
    pads); a row left with fewer than k candidates ends in index −1, score −inf (the fused op's
    contract). Equals sorting ``queries @ corpus.T`` row by row, in O(B·(k + block)) memory.
    """
    if normalize:
        queries = torch.nn.functional.normalize(queries.float(), dim=-1)
        corpus = torch.nn.functional.normalize(corpus.float(), dim=-1)
    B, N = queries.shape[0], corpus.shape[0]
    k = min(k, N)
    best_s = queries.new_full((B, 0), float("-inf"), dtype=torch.float32)
    best_i = torch.empty((B, 0), dtype=torch.long, device=queries.device)
    for start in range(0, N, block):
        s = queries.float() @ corpus[start : start + block].float().T  # [B, block]
        if exclude is not None:
            local = exclude - start
            valid = (exclude >= 0) & (local >= 0) & (local < s.shape[1])
            rows = torch.arange(B, device=s.device)[:, None].expand_as(exclude)
            s[rows[valid], local[valid]] = float("-inf")
        idx = torch.arange(start, start + s.shape[1], device=s.device).expand(B, -1)
        best_s, best_i = _merge(torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1), k)
    return best_s, best_i.masked_fill(best_s == float("-inf"), -1)


def _merge(scores: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best of each row, ordered by score then index (two stable sorts)."""
    by_index = torch.sort(indices, dim=1, stable=True)
    s = scores.gather(1, by_index.indices)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), by_index.values.gather(1, order)


def similarity_topk(
    queries: Tensor, corpus: Tensor, k: int, *, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """fastpref's fused top-k similarity op where the build has it, else :func:`chunked_topk`
    (the one switch point for evaluation and ``fastpref-mine``)."""
    import fastpref

    k = min(k, corpus.shape[0])
    fused = getattr(fastpref, "similarity_topk", None)
    if fused is not None:
        scores, indices = fused(queries, corpus, k, exclude=exclude, normalize=False)
        return scores, indices
    return chunked_topk(queries, corpus, k, exclude=exclude)


def retrieval_metrics(
    scores: Tensor, indices: Tensor, relevant: Sequence[Sequence[int]]
) -> dict[str, float]:
    """recall@1, recall@10, MRR@10 and nDCG@10 (binary relevance), means over the queries.

    By trec_eval (``fastpref.data.ir``): ``recall_k`` = relevant in the top k / all relevant;
    ``ndcg_cut_10`` normalised by the ideal ranking of *all* relevant documents (retrieved or
    not); MRR@10 = ``recip_rank`` of the run cut at rank 10 (0 when no relevant document is in
    the top 10).
    """
    qrels = {f"q{i}": {f"d{d}": 1 for d in rel} for i, rel in enumerate(relevant)}
    rankings = {
        f"q{i}": [f"d{d}" for d, s in zip(i_row, s_row, strict=True) if s != float("-inf")]
        for i, (s_row, i_row) in enumerate(zip(scores.tolist(), indices.tolist(), strict=True))
    }
    table = evaluate_rankings(qrels, rankings, {"recall.1,10", "ndcg_cut.10", MRR_AT_10})
    n = len(qrels)

    def mean(key: str) -> float:
        return sum(table.get(q, {}).get(key, 0.0) for q in qrels) / n

    return {
        "recall@1": mean("recall_1"),
        "recall@10": mean("recall_10"),
        "MRR@10": mean(MRR_AT_10),
        "nDCG@10": mean("ndcg_cut_10"),
    }
