"""Worker for bench_embedding.py: train all-MiniLM-L6-v2 with sentence-transformers'
``MultipleNegativesRankingLoss`` or ``CachedMultipleNegativesRankingLoss`` on given batches.

``python bench/_st_worker.py CONFIG.json RESULT.json``. CONFIG: ``model`` (directory), ``data``
(JSONL of ``{"anchor", "positive", "negative"}`` in step order), ``loss`` ("mnrl" | "cached"),
``batch``, ``steps``, ``max_length``, ``mini_batch`` (cached only), ``lr``. The loop is what
sentence-transformers' trainer runs per step, without its data pipeline: tokenise the three
columns (``model.preprocess``), the loss (scale 20 = τ 0.05, cosine), backward, gradient clipping
at 1.0, ``torch.optim.AdamW``. RESULT: each step's wall and CPU seconds, its loss, peak RSS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _common import peak_rss_mb


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from sentence_transformers import SentenceTransformer, losses

    rows = [json.loads(line) for line in Path(cfg["data"]).read_text().splitlines()]
    model = SentenceTransformer(cfg["model"], device="cpu")
    model.max_seq_length = cfg["max_length"]
    model.train()
    if cfg["loss"] == "cached":
        loss_fn = losses.CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=cfg["mini_batch"]
        )
    else:
        loss_fn = losses.MultipleNegativesRankingLoss(model)
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    B, steps = cfg["batch"], []
    for k in range(cfg["steps"]):
        batch = rows[k * B : (k + 1) * B]
        wall, cpu = time.perf_counter(), time.process_time()
        features = [tokenize([r[col] for r in batch]) for col in ("anchor", "positive", "negative")]
        loss = loss_fn(features, torch.zeros(len(batch)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(
            {
                "wall_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
                "loss": float(loss),
            }
        )
    result = {
        "steps": steps,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
