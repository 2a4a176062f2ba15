"""The embedding family (``--loss infonce`` / ``--loss rankpo``) end to end on a tiny BERT
(hidden 32, 2 layers, built from a config with the bundled tokenizer), plus its formats, batches,
retrieval metrics and bad input.

Rows are synthetic "where is the {animal} of {city}" queries; each passage names an animal and
a city, so a query has two positives (two phrasings of the same fact) and hard negatives that
share one of the two. Runs are 2-4 steps: the code paths are those of a real model.
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from fastpref.cli.train import main
from fastpref.families import embedding_formats as formats
from fastpref.families.embedding_eval import chunked_topk, retrieval_metrics
from fastpref.losses.contrastive import false_negative_pairs
from fastpref.models.embedding import EmbeddingModel, embedding_settings
from fastpref.paths import bundled_tokenizer_path
from fastpref.train import parse_config, train

ANIMALS = ["cat", "dog", "owl", "fox", "bee", "ant", "cow", "pig"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo"]


@pytest.fixture(scope="module", autouse=True)
def _own_process_group():
    """The trainer joins a one-rank gloo group; leave no group (DeepSpeed's cached clones of it
    included) or env vars behind for others."""
    env = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def _rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    triples, prefs = [], []
    for _ in range(n):
        a, c = rng.choice(ANIMALS), rng.choice(CITIES)
        pos = [f"the {a} lives in {c}", f"in {c} there is a {a}"]
        negs = [f"the {b} lives in {c}" for b in rng.sample([x for x in ANIMALS if x != a], 3)]
        negs.append(f"the {a} lives in {rng.choice([x for x in CITIES if x != c])}")
        triples.append({"query": f"where is the {a} of {c}", "positives": pos, "negatives": negs})
        good_first = rng.random() < 0.5
        p1, p2 = (pos[0], negs[0]) if good_first else (negs[0], pos[0])
        prefs.append({"query": triples[-1]["query"], "passage1": p1, "passage2": p2,
                      "preferred": "A" if good_first else "B"})  # fmt: skip
    return triples, prefs


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding")
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    triples, prefs = _rows(64)
    _write(root / "triples.jsonl", triples)
    _write(root / "prefs.jsonl", prefs)
    _write(root / "corpus.jsonl", [{"text": f"the {a} sleeps"} for a in ANIMALS])
    return root


def _args(emb, tmp_path, loss, *extra, steps=2):
    data = emb / ("triples.jsonl" if loss == "infonce" else "prefs.jsonl")
    return [
        "--loss", loss, "--model", str(emb / "model"), "--data", str(data),
        "--max-steps", str(steps), "--micro-batch", "8", "--lr", "1e-3", "--eval-fraction", "0.25",
        "--eval-every", "100", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
        "--output-dir", str(tmp_path / loss), *extra,
    ]  # fmt: skip


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _embed(path, texts, *, pooling="mean", normalize=True, prefix=""):
    tok = AutoTokenizer.from_pretrained(str(path))
    model = EmbeddingModel(AutoModel.from_pretrained(str(path)), pooling=pooling,
                           normalize=normalize).eval()  # fmt: skip
    batch = tok([prefix + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


# --------------------------------------------------------------------------- end to end


def test_infonce_trains_evaluates_and_saves_a_sentence_transformers_model(emb, tmp_path):
    args = _args(emb, tmp_path, "infonce", "--num-negatives", "2", "--corpus",
                 str(emb / "corpus.jsonl"), "--query-prefix", "query: ", steps=3)  # fmt: skip
    summary = train(parse_config(args))
    out = tmp_path / "infonce"
    records = _records(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(steps[0])
    for when in ("eval_before", "eval_after"):
        ev = summary[when]
        for key in ("eval/recall@1", "eval/recall@10", "eval/MRR@10", "eval/nDCG@10"):
            assert 0.0 <= ev[key] <= 1.0, (when, key)
        assert ev["eval/accuracy"] == ev["eval/nDCG@10"]
        assert ev["eval/recall@1"] <= 0.5  # two positives per query: one fits in the top 1
    assert (out / "curves.png").exists()
    # the saved model: plain AutoModel, and sentence-transformers with the same embeddings
    model_dir = out / "model"
    settings = embedding_settings(str(model_dir))
    assert (settings.pooling, settings.normalize) == ("mean", True)
    assert settings.prompts == {"query": "query: "}
    texts = ["the cat lives in rome", "where is the dog of oslo"]
    ours = _embed(model_dir, texts, prefix="query: ")
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    theirs = model.encode(texts, prompt_name="query", convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_rankpo_starts_at_ln2_uses_the_cached_reference_and_keeps_stage1_pooling(emb, tmp_path):
    """Stage 1 with --pooling cls, then stage 2 from its output: pooling read from the saved
    model (not switched to last-token), policy = reference so the step-0 loss is −log σ(0)."""
    stage1 = _args(emb, tmp_path, "infonce", "--pooling", "cls", "--num-negatives", "1", steps=1)
    train(parse_config(stage1))
    stage1_model = tmp_path / "infonce" / "model"
    assert embedding_settings(str(stage1_model)).pooling == "cls"
    args = _args(emb, tmp_path, "rankpo", steps=2)
    args[args.index("--model") + 1] = str(stage1_model)
    args += ["--retrieval-eval", str(emb / "triples.jsonl")]
    summary = train(parse_config(args))
    assert summary["reference_cache_hit"] is False
    before = summary["eval_before"]
    assert before["eval/loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert before["eval/rewards/margins"] == 0.0
    assert 0.0 <= before["eval/preference_accuracy"] <= 1.0 and "eval/nDCG@10" in before
    steps = [r for r in _records(tmp_path / "rankpo") if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert embedding_settings(str(tmp_path / "rankpo" / "model")).pooling == "cls"
    args[args.index("--output-dir") + 1] = str(tmp_path / "again")
    assert train(parse_config(args))["reference_cache_hit"] is True


def test_rankpo_reference_free_hinge_reports_preference_accuracy(emb, tmp_path):
    args = _args(emb, tmp_path, "rankpo", "--reference-free", "--loss-type", "hinge", steps=1)
    summary = train(parse_config(args))
    assert summary["reference_cache_hit"] is None  # no reference was ever computed
    after = summary["eval_after"]
    assert after["eval/accuracy"] == after["eval/preference_accuracy"]
    assert "eval/nDCG@10" not in after  # no --retrieval-eval: nothing to rank


# --------------------------------------------------------------------------- formats, batches


def _load(path, fmt=formats.TRIPLES, columns=None, k=0):
    return formats.load_rows(str(path), fmt, columns=columns, num_negatives=k)


def test_sentence_transformers_layouts_and_joined_columns(tmp_path):
    st = _write(tmp_path / "st.jsonl", [
        {"anchor": "q", "positive": "p", "negative_2": "n2", "negative_1": "n1"},
        {"anchor": "q", "positive": "p", "negative": "n"},
        {"anchor": "q", "positive": "p"},
    ])  # fmt: skip
    rows = _load(st)
    assert rows[0] == {"query": "q", "positives": ["p"], "negatives": ["n1", "n2"]}
    assert rows[1]["negatives"] == ["n"] and rows[2]["negatives"] == []
    mine = _write(tmp_path / "mine.jsonl", [{"question": "q", "answer": "p", "a": "n1", "b": "n2"}])
    columns = {"query": "question", "positives": "answer", "negatives": "a+b"}
    assert _load(mine, columns=columns, k=2) == [
        {"query": "q", "positives": ["p"], "negatives": ["n1", "n2"]}
    ]
    prefs = _write(tmp_path / "p.jsonl", [{"query": "q", "passage1": "x", "passage2": "y",
                                           "preferred": "B"}])  # fmt: skip
    assert _load(prefs, formats.PREFERENCE) == [{"query": "q", "chosen": "y", "rejected": "x"}]


BAD = [
    ({"query": "q", "positives": [], "negatives": ["n"] * 5}, "'positives' is an empty list"),
    ({"query": "q", "positives": ["p", 3], "negatives": ["n"] * 5}, "'positives' item 1 must be"),
    ({"query": ["q"], "positives": ["p"], "negatives": ["n"] * 5}, "'query' must be a string"),
    (
        {"query": "q", "positives": ["p"], "negatives": ["n"] * 2},
        "'negatives' has 2 texts, fewer than --num-negatives 5",
    ),
    ({"query": "q", "positives": ["p"], "negatives": {"a": 1}}, "'negatives' must be a string"),
]


@pytest.mark.parametrize(("row", "message"), BAD)
def test_bad_triples_exit_2_naming_file_line_and_field(emb, tmp_path, capsys, row, message):
    good = {"query": "q", "positives": ["p"], "negatives": ["n"] * 5}
    data = _write(tmp_path / "bad.jsonl", [good, good, row])
    args = _args(emb, tmp_path, "infonce")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"bad.jsonl: line 3: field {message}" in err, err


def test_bad_preference_and_options_exit_2(emb, tmp_path, capsys):
    row = {"query": "q", "passage1": "x", "passage2": "y", "preferred": "C"}
    data = _write(tmp_path / "bad.jsonl", [row])
    args = _args(emb, tmp_path, "rankpo")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    assert (
        "bad.jsonl: line 1: field 'preferred' must be \"A\" (passage1)" in capsys.readouterr().err
    )
    assert main(_args(emb, tmp_path, "rankpo", "--gather-negatives")) == 2
    assert "--gather-negatives is not an option of --loss rankpo" in capsys.readouterr().err
    assert main(_args(emb, tmp_path, "rankpo", "--ref-model", "none")) == 2
    assert "--reference-free" in capsys.readouterr().err
    assert main(_args(emb, tmp_path, "infonce", "--columns", "prompt=q")) == 2
    assert "not a field of format 'triples'" in capsys.readouterr().err


def test_a_decoder_cannot_pool_cls(assets, emb, tmp_path, capsys):
    """The tiny Llama of conftest is a decoder: cls pooling is refused; last pooling trains."""
    args = _args(emb, tmp_path, "infonce", "--num-negatives", "1", steps=1)
    args[args.index("--model") + 1] = str(assets / "model")
    assert main([*args, "--pooling", "cls"]) == 2
    assert "is a decoder" in capsys.readouterr().err
    summary = train(parse_config(args))  # default pooling for a decoder: the last token
    assert math.isfinite(summary["eval_after"]["eval/loss"])
    assert embedding_settings(str(tmp_path / "infonce" / "model")).pooling == "last"


def _examples(rows, split="train"):
    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    q, p = formats.Tokens(tok, "", 32), formats.Tokens(tok, "", 32)
    return formats.tokenize_rows(rows, formats.TRIPLES, q, p, split), tok.pad_token_id


def test_batches_draw_reproducibly_and_mark_every_false_negative():
    rows = [
        {"query": "q0", "positives": ["a", "b"], "negatives": ["x", "y", "z"]},
        {"query": "q1", "positives": ["c"], "negatives": ["a", "w", "v"]},  # a: q0's positive
        {"query": "q2", "positives": ["b"], "negatives": ["u", "t", "s"]},  # b: q0's positive
    ]
    examples, pad_id = _examples(rows)

    def draw(seed):
        rng = random.Random(seed)
        return [formats.collate(examples, formats.TRIPLES, pad_id, num_negatives=3, rng=rng)
                for _ in range(4)]  # fmt: skip

    one, two, other = draw(0), draw(0), draw(1)
    assert all(
        torch.equal(x["passage_ids"], y["passage_ids"]) for x, y in zip(one, two, strict=True)
    )
    assert any(
        not torch.equal(x["passage_ids"], y["passage_ids"]) for x, y in zip(one, other, strict=True)
    )
    for batch in one:
        assert batch["passage_ids"].shape[0] == 3 * 4 and batch["group_size"] == 4
        keys, pos_keys = batch["passage_keys"], batch["positive_keys"]
        rows_, cols = false_negative_pairs(pos_keys, keys, exclude=torch.arange(3) * 4)
        pairs = set(zip(rows_.tolist(), cols.tolist(), strict=True))
        a, b = formats.text_key("a"), formats.text_key("b")
        # q0 never sees a or b as a negative (a: in q1's group; b: q2's positive, or its own
        # other positive); q2 never sees b (q0's positive when q0 drew b)
        want = {(0, j) for j in range(12) if j != 0 and int(keys[j]) in (a, b)}
        want |= {(2, j) for j in range(12) if j != 8 and int(keys[j]) == b}
        assert (0, 8) in want and len(want) == 2 + (int(keys[0]) == b)
        assert pairs == want
    held_out, _ = _examples(rows, "eval")
    fixed = formats.collate(held_out, formats.TRIPLES, pad_id, num_negatives=2, rng=random.Random())
    assert fixed["passage_keys"][:3].tolist() == [formats.text_key(t) for t in ("a", "x", "y")]


# --------------------------------------------------------------------------- retrieval


def test_retrieval_metrics_are_trec_eval_definitions():
    """Query 0: relevant {0, 1}; ranking 0, 2, 3 (1 not retrieved). nDCG@10 is normalised over
    *both* relevant documents: (1/log2 2) / (1/log2 2 + 1/log2 3) = 1/(1 + 0.6309) = 0.6131
    (RankPO's sklearn eval would say 1.0). recall@1 = 1/2, recall@10 = 1/2, MRR@10 = 1.
    Query 1: relevant {3} at rank 2: nDCG = 1/log2 3 = 0.6309, recall@1 = 0, MRR = 1/2."""
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.7, 0.6]])
    indices = torch.tensor([[0, 2, 3], [1, 3, 0]])
    m = retrieval_metrics(scores, indices, [[0, 1], [3]])
    assert m["nDCG@10"] == pytest.approx((1 / (1 + 1 / math.log2(3)) + 1 / math.log2(3)) / 2)
    assert m["recall@1"] == pytest.approx(0.25) and m["recall@10"] == pytest.approx(0.75)
    assert m["MRR@10"] == pytest.approx(0.75)


def test_chunked_topk_is_a_sort_with_ties_by_index_and_exclusions():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 8, generator=g)
    c = torch.randn(50, 8, generator=g)
    c[20] = c[7]  # an exact tie: the lower index ranks first
    exclude = torch.tensor([[3, -1], [7, 20], [-1, -1], [0, 1], [49, 48], [5, 5]])
    s, idx = chunked_topk(q, c, 10, exclude=exclude, block=7)
    full = q @ c.T
    for i in range(6):
        banned = {int(e) for e in exclude[i] if e >= 0}
        order = sorted((j for j in range(50) if j not in banned), key=lambda j: (-full[i, j], j))
        assert idx[i].tolist() == order[:10]
        torch.testing.assert_close(s[i], full[i, order[:10]])
