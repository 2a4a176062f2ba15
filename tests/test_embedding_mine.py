"""``fastpref-mine``: each query's top-ranked corpus passages that are not its positives, as a
triples file, in a deterministic order — checked against a brute-force ranking with the same
tiny BERT (hidden 32, 2 layers) and the bundled tokenizer."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from fastpref.cli.mine import main
from fastpref.families import embedding_formats as formats
from fastpref.models.embedding import EmbeddingModel
from fastpref.paths import bundled_tokenizer_path

WORDS = ["cat", "dog", "owl", "fox", "paris", "rome", "oslo", "river", "hill", "tower"]


def _setup(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    corpus = [f"the {a} by the {b}" for a in WORDS for b in WORDS if a != b][:40]
    rows = [
        {"query": f"where is the {w}", "positives": corpus[i : i + 2], "negatives": []}
        for i, w in enumerate(WORDS[:6])
    ]
    rows[2]["positives"].append(rows[2]["positives"][0])  # a duplicate positive is harmless
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    return rows, corpus


def _brute_force(tmp_path, rows, corpus):
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    model = EmbeddingModel(BertModel.from_pretrained(str(tmp_path / "model")), pooling="mean",
                           normalize=True).eval()  # fmt: skip

    def embed(texts):
        out = []
        for t in texts:  # one at a time: no padding, an independent computation
            b = tok([t], return_tensors="pt")
            with torch.no_grad():
                out.append(model(b["input_ids"], b["attention_mask"])[0])
        return torch.stack(out)

    q, c = embed([r["query"] for r in rows]), embed(corpus)
    scores = q @ c.T
    return [
        sorted(
            (j for j in range(len(corpus)) if corpus[j] not in r["positives"]),
            key=lambda j: (-float(scores[i, j]), j),
        )  # fmt: skip
        for i, r in enumerate(rows)
    ], scores


def test_mined_negatives_are_the_top_non_positives_in_order(tmp_path, capsys):
    rows, corpus = _setup(tmp_path)
    out = tmp_path / "mined.jsonl"
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "q.jsonl"),
            "--corpus", str(tmp_path / "c.jsonl"), "--output", str(out), "--num-negatives", "4",
            "--skip", "1", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["query"] for m in mined] == [r["query"] for r in rows]
    ranking, scores = _brute_force(tmp_path, rows, corpus)
    for i, (m, r) in enumerate(zip(mined, rows, strict=True)):
        assert m["positives"] == r["positives"]
        assert not set(m["negatives"]) & set(r["positives"])  # never one of its positives
        got = [corpus.index(t) for t in m["negatives"]]
        want = ranking[i][1:5]
        # batched (padded) and single-text encodings agree to float32 rounding: compare the
        # ranks where the scores are not within that rounding of each other
        assert len(got) == 4
        assert torch.allclose(scores[i, got], scores[i, want], atol=1e-5), (got, want)
    # the output is stage-1 data as fastpref-train reads it (4 negatives per query)
    assert len(formats.load_rows(str(out), formats.TRIPLES, columns=None, num_negatives=4)) == 6
    again = list(argv)
    again[again.index("--output") + 1] = str(tmp_path / "again.jsonl")
    assert main(again) == 0  # deterministic
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


def test_bad_input_exits_2(tmp_path, capsys):
    rows, _ = _setup(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "positives": []}) + "\n")
    assert main(["--model", str(tmp_path / "model"), "--data", str(bad), "--output",
                 str(tmp_path / "o.jsonl")]) == 2  # fmt: skip
    assert "bad.jsonl: line 1: field 'positives' is an empty list" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nope.jsonl"), "--output", "o.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err
