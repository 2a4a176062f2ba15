"""The shared trec_eval wrapper: hand-derived values, and our order kept over trec_eval's ties."""

import math

from fastpref.data.ir import MRR_AT_10, evaluate_rankings

DOCS = list("abcdefghijkl")  # 12 documents, best first


def test_one_relevant_document_at_rank_2():
    """nDCG@10 = (1/log2(3)) / (1/log2(2)) = 0.6309; MRR@10 = 1/2."""
    got = evaluate_rankings({"q": {"b": 1}}, {"q": DOCS}, {"ndcg_cut.10", MRR_AT_10})
    assert math.isclose(got["q"]["ndcg_cut_10"], 1 / math.log2(3), rel_tol=1e-9)
    assert got["q"][MRR_AT_10] == 0.5


def test_mrr_at_10_is_zero_past_rank_10_and_order_is_ours():
    """'l' is at rank 12: MRR@10 0 (plain recip_rank would say 1/12). The ranking z > a (not the
    alphabetical order trec_eval would use for equal scores) puts z first: MRR 1."""
    assert evaluate_rankings({"q": {"l": 1}}, {"q": DOCS}, {MRR_AT_10})["q"][MRR_AT_10] == 0.0
    assert evaluate_rankings({"q": {"z": 1}}, {"q": ["z", "a"]}, {MRR_AT_10})["q"][MRR_AT_10] == 1
