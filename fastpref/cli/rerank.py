"""``fastpref-rerank``: rerank candidate lists with a causal LM reranker, write TREC run files and
report nDCG@10, nDCG@5 and MRR@10 (trec_eval, via ``pytrec_eval``) of the first-stage order and
of the reranked one.

    fastpref-rerank --model runs/rankllm-.../model --data dev.jsonl --window 20 --stride 10 \\
        --top-k 100 [--decode] [--output run.trec]

The data is the reranker family's (``fastpref.families.reranker_formats``): plain lists
``{qid, query, passages, relevance|ranking}`` in first-stage order (relevance is optional here:
without it only the run file is written), or rank_llm conversations (one window each). Each list's
first ``--top-k`` candidates are reranked by a sliding window from the back to the front; a
window is ordered by FIRST's single-token scores (one forward per window) or, with ``--decode``,
by greedily generating the permutation, whose invalid, repeated or missing identifiers are
repaired (counted and reported). The prompt options default to the ``rerank_config.json`` the
trainer saved beside the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastpref-rerank",
        description="Rerank candidate lists with a listwise LLM reranker (FIRST or decoding).",
    )
    p.add_argument("--model", required=True, help="causal LM directory or hub name")
    p.add_argument("--tokenizer", help="tokenizer path (default: the model's)")
    p.add_argument("--data", required=True, help="lists to rerank (.jsonl or a .json array)")
    p.add_argument("--window", type=int, help="passages per window (default: the model's, or 20)")
    p.add_argument("--stride", type=int, help="window stride (default: the model's, or 10)")
    p.add_argument("--top-k", type=int, default=100, help="candidates reranked per list")
    p.add_argument("--identifiers", choices=("alpha", "numeric"), help="default: the model's")
    p.add_argument("--max-passage-words", type=int, help="default: the model's, or 300")
    p.add_argument("--context-size", type=int, help="default: the model's, or 4096")
    p.add_argument("--decode", action="store_true", help="generate the permutation instead")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward (FIRST)")
    p.add_argument("--output", help="TREC run file (default: <data stem>.rerank.trec)")
    p.add_argument("--first-stage-output", help="also write the input order as a run file")
    p.add_argument("--tag", default="fastpref", help="the run files' tag column")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--bf16", action="store_true", help="load the model in bfloat16")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _settings(args: argparse.Namespace) -> SimpleNamespace:
    """The prompt options: flags, else the model's rerank_config.json, else the defaults."""
    from fastpref.families.reranker import RERANK_CONFIG

    saved: dict = {}
    path = Path(args.model) / RERANK_CONFIG
    if path.is_file():
        saved = json.loads(path.read_text())
    defaults = {
        "identifiers": "alpha",
        "max_passage_words": 300,
        "context_size": 4096,
        "window": 20,
        "stride": 10,
    }
    out = {k: getattr(args, k) or saved.get(k, v) for k, v in defaults.items()}
    return SimpleNamespace(**out, micro_batch=max(1, args.batch_size // 2))


def run(args: argparse.Namespace) -> dict:
    import torch

    from fastpref.errors import ConfigError
    from fastpref.families import reranker as rr
    from fastpref.families import reranker_formats as rf
    from fastpref.families.base import Dist
    from fastpref.models import build_or_load_causal_lm, load_tokenizer
    from fastpref.models.rerank import ListwiseRanker

    cfg = _settings(args)
    if cfg.stride > cfg.window or cfg.window < 2 or args.top_k < 1:
        raise ConfigError("need --window >= 2, 1 <= --stride <= --window and --top-k >= 1")
    rows = rf.load_rows(args.data, cfg.identifiers)
    rows = [_top_k(row, args.top_k) for row in rows]
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    dtype = torch.bfloat16 if args.bf16 else None
    model = build_or_load_causal_lm(args.model, vocab_size=len(tokenizer), seed=0, dtype=dtype)
    device = torch.device(args.device)
    ranker = ListwiseRanker(model).to(device).eval()
    enc = rr.make_encoder(tokenizer, cfg, with_target=False)
    dist = Dist(device)
    windows = sum(len(rr.row_spans(row, cfg)) for row in rows)
    start = time.perf_counter()
    decoder = model if args.decode else None
    orders, repairs = rr.rerank_rows(ranker, rows, enc, cfg, dist, tokenizer, decoder)
    seconds = time.perf_counter() - start
    output = Path(args.output or Path(args.data).with_suffix(".rerank.trec"))
    rr.write_trec_run(output, rows, orders, args.tag)
    if args.first_stage_output:
        rr.write_trec_run(Path(args.first_stage_output), rows, None, args.tag + "-first-stage")
    summary = {
        "lists": len(rows),
        "windows": windows,
        "seconds": seconds,
        "windows/s": windows / seconds if seconds else float("nan"),
        "method": "decode" if args.decode else "first",
        "run": str(output),
    }
    if repairs is not None:
        summary["repairs"] = repairs.counts()
    judged = [i for i, row in enumerate(rows) if any(row["relevance"])]
    if judged:
        sub = [rows[i] for i in judged]
        summary["first_stage"] = rr.ir_metrics(sub, None)
        summary["reranked"] = rr.ir_metrics(sub, [orders[i] for i in judged])
    return summary


def _top_k(row: dict, k: int) -> dict:
    if row["kind"] == "conversation" or len(row["docids"]) <= k:
        return row
    return {**row, **{f: row[f][:k] for f in ("passages", "docids", "relevance")}}


def _report(summary: dict) -> None:
    print(
        f"fastpref-rerank: {summary['lists']} lists, {summary['windows']} windows by "
        f"{summary['method']} in {summary['seconds']:.1f} s ({summary['windows/s']:.2f} windows/s)"
    )
    if "repairs" in summary:
        r = summary["repairs"]
        print(
            f"repaired {r['repaired']} of {r['windows']} decoded windows "
            f"({r['invalid']} invalid, {r['repeated']} repeated, {r['missing']} missing ids)"
        )
    if "reranked" in summary:
        for name in summary["reranked"]:
            a, b = summary["first_stage"][name], summary["reranked"][name]
            print(f"{name}: first stage {a:.4f} -> reranked {b:.4f}")
    print(f"run file: {summary['run']}")


def main(argv: Sequence[str] | None = None) -> int:
    from fastpref.errors import InputError

    args = _parser().parse_args(argv)
    try:
        summary = run(args)
    except (InputError, FileNotFoundError) as e:
        print(f"fastpref-rerank: error: {e}", file=sys.stderr)
        return 2
    _report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
