"""The reranker family's parts on a tiny Llama (D=32, 2 layers, the bundled tokenizer): formats and
their errors, the prompt and identifiers, the rankllm objective against hand-derived values, the
model adapter against full logits (FIRST scores from K lm_head rows only, one forward for
combined), NEFTune, window planning, permutation repair and the trec_eval metrics.

Lists are 3-6 short passages so every test runs in well under a second.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastpref.constants import IGNORE_INDEX
from fastpref.errors import ConfigError, DataError
from fastpref.families import reranker_formats as rf
from fastpref.families.reranker import ir_metrics, write_trec_run
from fastpref.losses.rankllm import RankLLMOutputs, default_ranking_weight, rankllm
from fastpref.models.rerank import (
    ListwiseRanker,
    Window,
    neftune_noise,
    repair_permutation,
    sliding_window_rerank,
)

SYSTEM = "You are RankLLM, an intelligent assistant that can rank passages."


def _prompt(n: int, ids=rf.IDENTIFIERS["alpha"], stated: int | None = None) -> str:
    body = "".join(f"[{ids[j]}] passage number {j} about cats\n" for j in range(n))
    return f"I will provide you with {stated or n} passages.\n{body}Search Query: cats."


def _conv(target: str, n: int = 3, sharegpt: bool = True, **kw) -> dict:
    turns = [("system", SYSTEM), ("user", _prompt(n, **kw)), ("assistant", target)]
    if sharegpt:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[r], "value": t} for r, t in turns]}
    return {"conversations": [{"role": r, "content": t} for r, t in turns]}


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny(assets):
    tok = AutoTokenizer.from_pretrained(assets / "model")
    model = AutoModelForCausalLM.from_pretrained(assets / "model").eval()
    return tok, model


# --------------------------------------------------------------------------- formats


def test_window_spans_back_to_front():
    spans = rf.window_spans(100, 20, 10)
    assert spans[0] == (80, 100) and spans[-1] == (0, 20) and len(spans) == 9
    assert rf.window_spans(25, 20, 10) == [(5, 25), (0, 15)]
    assert rf.window_spans(7, 20, 10) == [(0, 7)]
    assert rf.window_spans(30, 20, 20) == [(10, 30), (0, 10)]


@pytest.mark.parametrize("sharegpt", [True, False])
def test_conversation_row_relevance_from_the_permutation(tmp_path, sharegpt):
    """[B] > [C] > [A] over K=3: gold ranks B=0, C=1, A=2, relevance K − r = A 1, B 3, C 2."""
    path = _write(tmp_path, [_conv("[B] > [C] > [A]", sharegpt=sharegpt)], "data.json")
    (row,) = rf.load_rows(path, "alpha")
    assert row["kind"] == "conversation" and row["system"] == SYSTEM
    assert row["relevance"] == [1.0, 3.0, 2.0]


def test_plain_rows_ranking_and_relevance(tmp_path):
    rows = [
        {"query": "q", "passages": ["a", "b", "c"], "ranking": [2, 0]},
        {
            "qid": "x",
            "query": "q",
            "passages": [{"text": "a", "title": "T"}, "b"],
            "relevance": [0, 2],
        },
    ]
    first, second = rf.load_rows(_write(tmp_path, rows), "alpha")
    assert first["relevance"] == [1.0, 0.0, 2.0] and first["qid"] == "q1"
    assert second["passages"][0] == "Title: T Content: a" and second["docids"] == ["x-0", "x-1"]


BAD_ROWS = [
    (_conv("[B] > [B] > [A]"), "field 'conversations' target names [B] twice"),
    (_conv("[B] > [D] > [A]"), "target names [D], not a passage of the prompt"),
    (_conv("[B] > [A]"), "target leaves out [C]"),
    (_conv("B > A > C"), "is not"),
    (
        {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "x"}]},
        "has no assistant turn",
    ),
    (_conv("[A] > [B]", n=2, stated=30), "30 passages, more than the 26 alpha identifiers"),
    (_conv("[1] > [2]", n=2, ids=rf.IDENTIFIERS["numeric"]), "marked [1], expected [A]"),
    ({"query": "q", "passages": ["a", "b"], "ranking": [0, 0]}, "field 'ranking' names passage 0"),
    ({"query": "q", "passages": ["a", "b"], "ranking": [5]}, "not a passage index in [0, 2)"),
    ({"query": "q", "passages": ["a", "b"], "relevance": [1]}, "field 'relevance' must be a list"),
    ({"query": "q", "passages": ["a", "b"]}, "exactly one of them"),
    ({"prompt": "hello"}, "expected 'conversations'"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    good = {"query": "q", "passages": ["a", "b"], "ranking": [1, 0]}
    path = _write(tmp_path, [good, row])
    with pytest.raises(DataError) as err:
        rf.load_rows(path, "alpha")
    assert f"{path}: line 2: " in str(err.value) and message in str(err.value), str(err.value)


def test_json_file_must_be_a_json_array(tmp_path):
    lines = tmp_path / "lines.json"
    lines.write_text(
        json.dumps(_conv("[A] > [B] > [C]")) + "\n" + json.dumps(_conv("[A] > [B] > [C]"))
    )
    with pytest.raises(DataError, match=r"lines.json: not a JSON array of rows"):
        rf.load_rows(str(lines), "alpha")
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"rows": 1}))
    with pytest.raises(DataError, match=r"obj.json: expected a JSON array of rows, got a dict"):
        rf.load_rows(str(obj), "alpha")
    array = tmp_path / "array.json"
    array.write_text(json.dumps([_conv("[A] > [B] > [C]"), _conv("[B] > [A]")]))
    with pytest.raises(DataError, match=r"array.json: row 2: field 'conversations' target"):
        rf.load_rows(str(array), "alpha")


def test_identifiers_must_be_single_tokens(tiny):
    tok, _ = tiny
    alpha = rf.Identifiers(tok, "alpha")
    ids = alpha.tokens(20)
    assert len(set(ids)) == 20 and tok.convert_ids_to_tokens(ids[:2]) == ["A", "B"]
    numeric = rf.Identifiers(tok, "numeric")
    assert len(numeric.tokens(9)) == 9  # "1".."9" are byte tokens of the bundled BPE
    with pytest.raises(ConfigError, match=r"identifier \[10\] is not a single token of the tok"):
        numeric.tokens(10)


def test_prompt_target_and_first_position(tiny):
    """The example is prompt + "[B] > [A] > [C]" + EOS; the token at first_pos is the target's
    "[" and its label (the next token) is the first identifier of the permutation."""
    tok, _ = tiny
    row = {"kind": "plain", "qid": "q", "query": "cats [1]", "passages": ["x " * 9, "y", "z"]}
    row.update(docids=["a", "b", "c"], relevance=[1.0, 2.0, 0.0])
    enc = rf.PromptEncoder(
        tok, rf.Identifiers(tok, "alpha"), max_passage_words=4, context_size=512, with_target=True
    )
    ex = enc.example(row, 0, [0, 1, 2], "here")
    text = tok.decode(ex["input_ids"][: ex["prompt_length"]])
    assert "[A] x x x x\n[B] y\n[C] z\n" in text and "cats (1)" in text and PROMPT_START in text
    target = tok.decode(ex["input_ids"][ex["prompt_length"] :], skip_special_tokens=True)
    assert target == "[B] > [A] > [C]"
    ids, p = ex["input_ids"], ex["first_pos"]
    assert tok.convert_ids_to_tokens(ids[p]) == "[" and ids[p + 1] == ex["id_tokens"][1]
    ranking = rf.PromptEncoder(
        tok, rf.Identifiers(tok, "alpha"), max_passage_words=4, context_size=512, with_target=False
    ).example(row, 0, [0, 1, 2], "here")
    assert ranking["input_ids"] == ids[: p + 1] and ranking["prompt_length"] == p + 1


PROMPT_START = "I will provide you with 3 passages, each indicated by an alphabetical identifier []"


# --------------------------------------------------------------------------- the objective


def _inputs(scores, relevance, logps=None, tokens=None):
    scores = torch.tensor(scores, dtype=torch.float32, requires_grad=True)
    relevance = torch.tensor(relevance, dtype=torch.float32)
    return RankLLMOutputs(
        relevance=relevance,
        mask=torch.ones_like(relevance, dtype=torch.bool),
        logps=None if logps is None else torch.tensor(logps),
        tokens=None if tokens is None else torch.tensor(tokens),
        scores=scores,
    )


def test_ranking_worked_example_is_ln2():
    loss, metrics = rankllm(_inputs([[0.0, 0.0]], [[1.0, 0.0]]), objective="ranking")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics.as_dict()["rewards/accuracies"] == 0.5  # a tie counts ½


def test_weighted_ranknet_is_rank_llms_mean_over_pairs():
    """rank_llm: BCEWithLogits(s_i − s_j, 1, weight 1/(r_i + r_j)) with mean reduction over
    the pairs of each list, then the mean over lists: written out pair by pair here."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, generator=g)
    rel = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [2.0, 5.0, 1.0, 4.0, 3.0]])
    expected = []
    for b in range(2):
        rank = {i: int((rel[b] > rel[b, i]).sum()) + 1 for i in range(5)}
        terms = [
            F.softplus(-(s[b, i] - s[b, j])) / (rank[i] + rank[j])
            for i in range(5)
            for j in range(5)
            if rel[b, i] > rel[b, j]
        ]
        expected.append(torch.stack(terms).mean())
    inputs = _inputs(s.tolist(), rel.tolist())
    loss, _ = rankllm(inputs, objective="ranking", weighted=True)
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)


def test_combined_is_generation_plus_lambda_ranking():
    """gen = −Σ logps / Σ tokens = 6/4 = 1.5; rank = ln 2 (one tied pair); λ = 10 when
    weighted ranknet (its one pair has ranks 1 and 2, weight 1/3)."""
    inputs = _inputs([[0.0, 0.0]], [[1.0, 0.0]], logps=[-6.0], tokens=[4.0])
    loss, m = rankllm(inputs, objective="combined", weighted=True)
    assert loss.item() == pytest.approx(1.5 + 10 * math.log(2) / 3, rel=1e-6)
    assert m.as_dict()["nll_loss"] == pytest.approx(1.5)
    loss, _ = rankllm(inputs, objective="combined", ranking_weight=2.0)
    assert loss.item() == pytest.approx(1.5 + 2 * math.log(2), rel=1e-6)
    only_gen, _ = rankllm(
        RankLLMOutputs(inputs.relevance, inputs.mask, inputs.logps, inputs.tokens),
        objective="generation",
    )
    assert only_gen.item() == pytest.approx(1.5)


def test_default_lambdas_and_bad_combinations():
    assert default_ranking_weight("ranknet", True) == 10.0
    assert default_ranking_weight("listnet", False) == 0.1
    assert default_ranking_weight("ranknet", False) == default_ranking_weight("lambda", True) == 1
    with pytest.raises(ValueError, match="applies to ranknet and lambda"):
        rankllm(_inputs([[0.0, 1.0]], [[1.0, 0.0]]), ranking_loss="listnet", weighted=True)
    with pytest.raises(ValueError, match="needs RankLLMOutputs.logps"):
        rankllm(_inputs([[0.0, 1.0]], [[1.0, 0.0]]), objective="combined")


@pytest.mark.parametrize("kind", ["ranknet", "lambda", "listnet", "listmle"])
def test_every_ranking_loss_has_a_gradient_and_tied_lists_drop_out(kind):
    inputs = _inputs([[0.3, -0.2, 0.1], [0.5, 0.5, 0.5]], [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = rankllm(inputs, objective="ranking", ranking_loss=kind)
    loss.backward()
    assert torch.isfinite(loss) and inputs.scores.grad[0].abs().sum() > 0
    assert torch.all(inputs.scores.grad[1] == 0)  # all tied: no pair, not in the mean


# --------------------------------------------------------------------------- the model adapter


def _batch(tok, n_rows=3):
    """Right-padded rows with labels on a 4-token target and the FIRST position before it."""
    g = torch.Generator().manual_seed(1)
    lengths = [14, 11, 9][:n_rows]
    L = max(lengths)
    ids = torch.full((n_rows, L), tok.pad_token_id)
    mask = torch.zeros((n_rows, L), dtype=torch.long)
    labels = torch.full((n_rows, L), IGNORE_INDEX)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, len(tok), (n,), generator=g)
        mask[b, :n] = 1
        labels[b, n - 5 : n - 1] = ids[b, n - 4 : n]
    first = torch.tensor([n - 5 for n in lengths])
    id_tokens = torch.tensor(rf.Identifiers(tok, "alpha").tokens(4)).expand(n_rows, 4)
    return ids, mask, labels, first, id_tokens


def test_adapter_equals_full_logits(tiny):
    tok, model = tiny
    ids, mask, labels, first, id_tokens = _batch(tok)
    out = ListwiseRanker(model)(ids, mask, labels, first, id_tokens)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    rows = torch.arange(len(ids))
    ref_scores = logits[rows[:, None], first[:, None], id_tokens]
    torch.testing.assert_close(out.scores, ref_scores, atol=1e-5, rtol=1e-5)
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref_logps = torch.where(labels != IGNORE_INDEX, logp, 0.0).sum(-1)
    torch.testing.assert_close(out.logps, ref_logps, atol=1e-4, rtol=1e-5)
    assert out.tokens.tolist() == [4.0, 4.0, 4.0]


def test_ranking_reaches_only_the_identifier_rows_and_combined_is_one_forward(tiny):
    tok, model = tiny
    ids, mask, labels, first, id_tokens = _batch(tok)
    ranker = ListwiseRanker(model)
    calls = []
    handle = model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        model.zero_grad()
        out = ranker(ids, mask, None, first, id_tokens)
        out.scores.sum().backward()
        grad = model.lm_head.weight.grad
        touched = grad.abs().sum(-1).nonzero()[:, 0].tolist()
        assert touched == sorted(set(id_tokens[0].tolist()))
        assert out.logps is None
        calls.clear()
        both = ranker(ids, mask, labels, first, id_tokens)
        assert len(calls) == 1 and both.logps is not None and both.scores is not None
    finally:
        handle.remove()
        model.zero_grad()


def test_neftune_noise_bound_and_only_in_training(tiny):
    tok, model = tiny
    ids, mask, labels, first, id_tokens = _batch(tok)
    L, d, alpha = ids.shape[1], model.config.hidden_size, 5.0
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].detach()), with_kwargs=True
    )
    try:
        noisy = ListwiseRanker(model, neftune_alpha=alpha)
        clean = model.get_input_embeddings()(ids).detach()
        noisy.train()
        torch.manual_seed(0)
        noisy(ids, mask, labels, first, id_tokens)
        noise = seen[-1] - clean
        bound = alpha / math.sqrt(L * d)
        assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.9 * bound
        assert abs(noise.mean().item()) < 0.05 * bound
        noisy.eval()  # evaluation and reranking see the clean embeddings
        a = noisy(ids, mask, labels, first, id_tokens)
        assert torch.equal(seen[-1], clean)
        b = ListwiseRanker(model)(ids, mask, labels, first, id_tokens)
        assert torch.equal(a.scores, b.scores)
    finally:
        handle.remove()
        model.eval()
    x = torch.zeros(2, 10, 8)
    assert neftune_noise(x, 0.0).abs().max() == 0


# --------------------------------------------------------------------------- reranking


def test_repair_counts_invalid_repeated_and_missing():
    order, rep = repair_permutation(["B", "B", "Z", "A"], ["A", "B", "C", "D"])
    assert order == [1, 0, 2, 3]
    assert (rep.invalid, rep.repeated, rep.missing, rep.repaired) == (1, 1, 2, 1)
    order, rep = repair_permutation(["C", "A", "B"], ["A", "B", "C"])
    assert order == [2, 0, 1] and rep.repaired == 0


def _oracle(true_scores):
    """order_windows that sorts each window by a known score (windows carry the candidates)."""

    def order(windows):
        return [
            sorted(range(len(w.prompt_ids)), key=lambda j: -true_scores[w.prompt_ids[j]])
            for w in windows
        ]

    return order


def test_sliding_window_brings_the_top_stride_to_the_front():
    """With window 20 and stride 10 from the back, the 10 best of 100 end at the top, in order."""
    g = torch.Generator().manual_seed(0)
    score = torch.randn(100, generator=g).tolist()
    plans = [rf.window_spans(100, 20, 10)]
    window_of = lambda q, cands: Window(prompt_ids=list(cands), id_tokens=[0] * len(cands))  # noqa: E731
    (order,) = sliding_window_rerank(plans, window_of, _oracle(score), batch_size=1)
    best = sorted(range(100), key=lambda j: -score[j])
    assert order[:10] == best[:10] and sorted(order) == list(range(100))


def test_windows_batched_across_lists_match_one_list_at_a_time():
    g = torch.Generator().manual_seed(1)
    sizes = [25, 7, 60, 20]
    scores = [torch.randn(n, generator=g).tolist() for n in sizes]
    plans = [rf.window_spans(n, 20, 10) for n in sizes]
    calls = []

    def window_of(q, cands):
        return Window(prompt_ids=[q * 1000 + c for c in cands], id_tokens=[0] * len(cands))

    def order(windows):
        calls.append(len(windows))
        flat = {q * 1000 + j: s for q, sc in enumerate(scores) for j, s in enumerate(sc)}
        return _oracle(flat)(windows)

    together = sliding_window_rerank(plans, window_of, order, batch_size=4, steps=7)
    assert calls == [4, 2, 1, 1, 1, 0, 0]  # the j-th windows of every list, then empty batches
    alone = [
        sliding_window_rerank([p], lambda _q, c, q=q: window_of(q, c), order, batch_size=1)[0]
        for q, p in enumerate(plans)
    ]
    assert together == alone


def test_ir_metrics_are_trec_evals():
    """One list, relevance [0, 1] in input order: nDCG@10 = (1/log2 3)/(1/log2 2) = 0.6309,
    MRR@10 = 1/2; reversed: 1 and 1."""
    row = {"qid": "q", "docids": ["d0", "d1"], "relevance": [0.0, 1.0]}
    first = ir_metrics([row], None)
    assert first["nDCG@10"] == pytest.approx(1 / math.log2(3), abs=1e-4)
    assert first["MRR@10"] == pytest.approx(0.5)
    assert ir_metrics([row], [[1, 0]]) == {"nDCG@10": 1.0, "nDCG@5": 1.0, "MRR@10": 1.0}


def test_trec_run_file(tmp_path):
    rows = [{"qid": "q1", "docids": ["a", "b", "c"], "relevance": [0, 0, 1]}]
    write_trec_run(tmp_path / "run.trec", rows, [[2, 0, 1]], "fastpref")
    assert (tmp_path / "run.trec").read_text().splitlines() == [
        "q1 Q0 c 1 3 fastpref",
        "q1 Q0 a 2 2 fastpref",
        "q1 Q0 b 3 1 fastpref",
    ]
