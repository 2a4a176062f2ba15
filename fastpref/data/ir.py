"""Information-retrieval metrics by trec_eval (``pytrec_eval``), for rankings we already hold.

Every family that ranks (embedding retrieval, LLM reranking) scores its rankings here, so the
trec_eval conventions live once: a ranking is handed over best first, as strictly decreasing
pseudo-scores (trec_eval re-sorts by score and would break our ties by document name), and
MRR@10 is ``recip_rank`` of the ranking cut at rank 10 (0 without a relevant document there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["MRR_AT_10", "evaluate_rankings"]

MRR_AT_10 = "recip_rank@10"


def evaluate_rankings(
    qrels: Mapping[str, Mapping[str, int]],
    rankings: Mapping[str, Sequence[str]],
    measures: set[str],
) -> dict[str, dict[str, float]]:
    """Per query, trec_eval's ``measures`` (e.g. ``"ndcg_cut.5,10"``, ``"recall.1,10"``) of each
    ranking (document ids, best first), plus ``recip_rank@10`` when ``measures`` names it.

    Returns ``{qid: {measure: value}}`` for the queries trec_eval scored (those in both ``qrels``
    and ``rankings``); how to average, and over which queries, is the caller's.
    """
    import pytrec_eval

    def run(cut: int | None) -> dict[str, dict[str, float]]:
        return {
            q: {d: float(len(docs) - r) for r, d in enumerate(list(docs)[:cut])}
            for q, docs in rankings.items()
        }

    qrels = {q: dict(rel) for q, rel in qrels.items()}
    plain = measures - {MRR_AT_10}
    out: dict[str, dict[str, float]] = {}
    if plain:
        for q, values in pytrec_eval.RelevanceEvaluator(qrels, plain).evaluate(run(None)).items():
            out.setdefault(q, {}).update(values)
    if MRR_AT_10 in measures:
        cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run(10))
        for q, values in cut.items():
            out.setdefault(q, {})[MRR_AT_10] = values["recip_rank"]
    return out
