"""How fast the bundled tiny Llama, built from scratch, learns the skill FIRST's scores need.

FIRST (``--loss rankllm``) reads one logit per passage identifier at the first generated
position. To score a passage by its content, the model must tie the passage's words to its
identifier (one attention hop) and pick the identifiers whose passages match the query (a
second hop that composes with the first). This probe strips the task to that core: ``K``
one-token passages with distinct topics, a one-token query equal to one of them, and a
cross-entropy over the ``K`` identifier logits at the last position (chance: ln K). Nothing of
the prompt template, the tokenizer or the trainer is in the way, so what it measures is the
model's learning alone: the bundled architecture (``fastpref/assets/model/config.json``), AdamW
at a constant lr, gradients clipped at 1.

    python scripts/rerank_learnability.py --passages 4 --steps 6000 --batch 16
    python scripts/rerank_learnability.py --passages 4 --steps 6000 --batch 16 --control

``--control`` asks for the one-hop half only (name the query's token, at a fixed offset): it is
learnt within a few hundred steps, so the optimiser and the model are sound. ``--layout after``
puts each passage's topic before its identifier instead of after it (``t [A]``, where the
identifier's position can see its passage). README.md (the reranker section) gives the results.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

ASSETS = Path(__file__).resolve().parents[1] / "fastpref" / "assets" / "model" / "config.json"
QUERY, OPEN, CLOSE, NEWLINE = 3, 4, 5, 6  # token ids of the probe's own little vocabulary
IDENTIFIER0, TOPIC0, TOPICS = 10, 100, 200  # identifiers 10.., topics 100..299


def example(rng: random.Random, k: int, layout: str) -> tuple[list[int], int, int]:
    """Token ids, the index of the passage matching the query, and the query's topic."""
    topics = rng.sample(range(TOPIC0, TOPIC0 + TOPICS), k)
    answer = rng.randrange(k)
    ids = [QUERY, topics[answer], NEWLINE]
    for j, topic in enumerate(topics):
        marker = [OPEN, IDENTIFIER0 + j, CLOSE]
        ids += (marker + [topic] if layout == "before" else [topic] + marker) + [NEWLINE]
    return ids + [QUERY, topics[answer], NEWLINE, OPEN], answer, topics[answer]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=4, help="passages per list (K)")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--layout", choices=("before", "after"), default="before",
                    help="identifier before its passage (RankZephyr) or after it")  # fmt: skip
    ap.add_argument("--control", action="store_true", help="predict the query's topic instead")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 2 <= args.passages <= 26:
        ap.error(f"--passages must be 2..26, got {args.passages}")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = LlamaConfig(**json.loads(ASSETS.read_text()))
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    k = args.passages
    identifiers = range(IDENTIFIER0, IDENTIFIER0 + k)
    classes = range(TOPIC0, TOPIC0 + TOPICS) if args.control else identifiers
    chance = math.log(len(classes))
    print(f"K={k} layout={args.layout} control={args.control} chance loss {chance:.3f}")
    start, every = time.time(), max(1, args.steps // 10)
    for step in range(1, args.steps + 1):
        rows = [example(rng, k, args.layout) for _ in range(args.batch)]
        ids = torch.tensor([r[0] for r in rows])
        target = torch.tensor([r[2] - TOPIC0 if args.control else r[1] for r in rows])
        logits = model(input_ids=ids).logits[:, -1, list(classes)]
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % every == 0:
            acc = (logits.argmax(1) == target).float().mean().item()
            print(f"step {step:6d}  loss {loss.item():.3f}  batch accuracy {acc:.2f}  "
                  f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
