"""GradCache (``EmbeddingModel(..., chunk)``, ``--embed-chunk``): encoding a batch a few rows at a
time without grad and replaying each chunk with grad in backward gives the parameter gradients
of the unchunked forward.

A tiny BERT (hidden 32, 2 layers) in float32. Without dropout the two paths do the same math
row by row (a chunk is a slice of the same batch, packed its own way), so the gradients agree
to float32 rounding of the GEMMs' different shapes (rtol 1e-5, atol 1e-5 of the largest). With
dropout, each chunk's RNG state is replayed: the gradient equals that of encoding the same chunks
in order *with* grad.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from fastpref.losses import ContrastiveEmbeddings, infonce_loss
from fastpref.models.embedding import EmbeddingModel
from fastpref.paths import bundled_tokenizer_path
from fastpref.train import parse_config, train

TEXTS = [
    f"the {a} lives in {c} near the {r}"
    for a in ("cat", "dog", "owl")
    for c in ("paris", "oslo")
    for r in ("river", "old tower")
]  # fmt: skip  12 texts, 2 lengths


def _model(dropout: float) -> tuple[EmbeddingModel, dict]:
    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EmbeddingModel(BertModel(config), pooling="mean", normalize=True).train()
    return model, tok(TEXTS, padding=True, return_tensors="pt")


def _loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return infonce_loss(ContrastiveEmbeddings(q, p), temperature=0.05)[0]


def _grads(model: EmbeddingModel) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _step(model, batch, chunk: int) -> torch.Tensor:
    """4 queries (rows 0-3), 8 passages (rows 4-11): groups of 2."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    q = model(ids[:4], mask[:4], chunk)
    p = model(ids[4:], mask[4:], chunk)
    loss = _loss(q, p)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_gradient_equals_the_unchunked_one(chunk):
    model, batch = _model(dropout=0.0)
    want_loss = _step(model, batch, 0)
    want = _grads(model)
    got_loss = _step(model, batch, chunk)
    got = _grads(model)
    assert set(got) == set(want) and len(want) > 10
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    # atol: float32 rounding of sums over every token (the token-type row sums ~100 of them;
    # the key biases' true gradient is 0, theirs is pure rounding)
    atol = 1e-5 * max(float(g.abs().max()) for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=atol, msg=name)


def test_dropout_is_replayed_chunk_by_chunk():
    model, batch = _model(dropout=0.3)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    torch.manual_seed(7)  # by hand: the same chunks, in the same order, encoded with grad
    q = torch.cat([model.embed(ids[0:3], mask[0:3]), model.embed(ids[3:4], mask[3:4])])
    p = torch.cat([model.embed(ids[s : s + 3], mask[s : s + 3]) for s in range(4, 12, 3)])
    _loss(q, p).backward()
    want = _grads(model)
    torch.manual_seed(7)
    _step(model, batch, 3)
    got = _grads(model)
    atol = 1e-5 * max(float(g.abs().max()) for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=atol, msg=name)
    torch.manual_seed(7)
    _step(model, batch, 0)  # one unchunked draw: other dropout masks, another gradient
    assert any(not torch.allclose(g, want[n]) for n, g in _grads(model).items())


@pytest.fixture(scope="module", autouse=True)
def _own_process_group():
    env = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def test_embed_chunk_trains_like_the_whole_batch(tmp_path):
    """Two optimizer steps through the trainer (DeepSpeed's backward): --embed-chunk 3 logs the
    same losses as the unchunked run, so the first update was the same."""
    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"query": f"where is {t}", "positives": [t], "negatives": [TEXTS[(i + 5) % 12]]}
            for i, t in enumerate(TEXTS * 2)]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for chunk in ("0", "3"):
        out = tmp_path / f"run{chunk}"
        args = ["--loss", "infonce", "--model", str(tmp_path / "model"), "--data",
                str(tmp_path / "d.jsonl"), "--num-negatives", "1", "--micro-batch", "8",
                "--max-steps", "2", "--lr", "1e-3", "--no-dropout", "--embed-chunk", chunk,
                "--eval-every", "100", "--no-progress", "--output-dir", str(out)]  # fmt: skip
        train(parse_config(args))
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[chunk] = [r["loss"] for r in records if "loss" in r]
    assert losses["3"] == pytest.approx(losses["0"], rel=1e-5)


@pytest.mark.parametrize(("kind", "pooling"), [("bert", "mean"), ("bert", "cls"), ("llama", "last"),
                                               ("llama", "mean")])  # fmt: skip
def test_packed_rows_embed_like_the_padded_batch(kind, pooling):
    """Packing (texts side by side, block-diagonal mask, own positions; causal for the decoder)
    gives the padded batch's embeddings and parameter gradients. Judged three ways (STYLE.md):
    against the padded batch in float64, packed float32 is no worse than padded float32 plus a
    small tolerance (an untrained model's embeddings nearly coincide, so its InfoNCE gradient is a
    sum of cancelling terms: relative to itself, every float32 path is far from exact)."""
    from transformers import LlamaConfig, LlamaModel

    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    torch.manual_seed(0)
    if kind == "bert":
        backbone = BertModel(BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ))  # fmt: skip
    else:
        backbone = LlamaModel(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        ))  # fmt: skip
    batch = tok(TEXTS + ["a", "the cat"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def run(pack: bool, dtype: torch.dtype):
        model = EmbeddingModel(backbone.to(dtype), pooling=pooling, normalize=True, pack=pack)
        emb = model(ids, mask)
        _loss(emb[:4], emb[4:12]).backward()
        assert model.pack is pack
        return emb.detach().double(), {k: g.double() for k, g in _grads(model).items()}

    truth, packed, padded = (
        run(False, torch.float64),
        run(True, torch.float32),
        run(False, torch.float32),
    )
    cases = [(truth[0], packed[0], padded[0])] + [
        (truth[1][k], packed[1][k], padded[1][k]) for k in truth[1]
    ]
    # a parameter whose exact gradient is ~0 (cls pooling) is judged on the gradients' own scale
    floor = 1e-9 * max(float(t.abs().max()) for t, _, _ in cases[1:])
    for t, got, ref in cases:
        scale = float(t.abs().max())
        assert (got - t).abs().max() <= 2 * (ref - t).abs().max() + 1e-6 * scale + floor
