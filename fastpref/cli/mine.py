"""``fastpref-mine``: hard negatives for stage-1 (``--loss infonce``) data.

    fastpref-mine --data queries.jsonl --corpus corpus.jsonl --output mined.jsonl --num-negatives 10
    fastpref-mine --model runs/infonce-.../model --data triples.jsonl --skip 3 --output mined.jsonl

Every query (a ``triples`` row: ``query``, ``positives``, optional ``negatives``; the
sentence-transformers ``anchor``/``positive`` layout and ``--columns`` work as in
``fastpref-train``) and every corpus passage is embedded with the model (unset: the bundled
all-MiniLM-L6-v2), the corpus ranked per query by the fused ``fastpref.similarity_topk`` with the
query's own positives excluded (by text: a passage equal to one of its positives is never its
negative), and the passages at ranks ``skip+1 .. skip+k`` written as its ``negatives`` — a
``triples`` file ``fastpref-train --loss infonce`` reads. The order is deterministic (score, then
corpus position). The corpus is ``--corpus`` (``{"text"}`` per line, repeatable), else every
passage of ``--data``; duplicate texts count once. ``--skip`` leaves out the very top ranks,
where unlabelled positives hide (RankPO mines from a range of ranks for the same reason).
Corpora beyond memory are out of scope here (FAISS would be the tool).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastpref-mine",
        description="Mine hard negatives for stage-1 embedding data (fastpref-train --loss "
        "infonce): each query's top-ranked corpus passages that are not its positives.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="triples file: query, positives[, negatives]")
    p.add_argument("--output", required=True, help="the mined triples file (.jsonl) to write")
    p.add_argument("--corpus", action="append", help="{'text'} file(s); unset: --data's passages")
    p.add_argument("--model", help="embedding model; unset: the bundled all-MiniLM-L6-v2")
    p.add_argument("--num-negatives", type=int, default=10, help="negatives per query (k)")
    p.add_argument("--skip", type=int, default=0, help="top-ranked non-positives to leave out")
    p.add_argument("--keep-negatives", action="store_true", help="append to a row's negatives")
    p.add_argument("--columns", help="canonical=source,... as fastpref-train's --columns")
    p.add_argument("--pooling", choices=("cls", "mean", "last"), help="unset: the model's own")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--query-prefix", help="unset: the model's 'query' prompt, else none")
    p.add_argument("--passage-prefix", help="unset: the model's 'document' prompt, else none")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ...; unset: cuda when available")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def _columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    from fastpref.errors import ConfigError

    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"--columns: expected canonical=source[,...], got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def mine(args: argparse.Namespace) -> int:
    """Run the mining; returns the number of rows written."""
    import torch

    from fastpref.errors import ConfigError
    from fastpref.families import embedding_formats as formats
    from fastpref.families.base import Dist
    from fastpref.families.embedding_eval import encode, similarity_topk
    from fastpref.models import check_model_path, load_tokenizer
    from fastpref.models.embedding import (
        EmbeddingModel,
        load_backbone,
        resolve_embedding,
        resolve_model_path,
    )

    for flag in ("num_negatives", "max_length", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.skip < 0:
        raise ConfigError("--skip must be >= 0")
    for path in [args.data, *(args.corpus or [])]:
        if not Path(path).expanduser().exists():
            raise ConfigError(f"{path!r} does not exist")
    check_model_path(args.model, "model")
    rows = formats.load_rows(args.data, formats.TRIPLES, columns=_columns(args.columns))
    texts: dict[str, int] = {}
    if args.corpus:
        for source in args.corpus:
            for t in formats.load_corpus(source):
                texts.setdefault(t, len(texts))
    else:
        for r in rows:
            for t in (*r["positives"], *r["negatives"]):
                texts.setdefault(t, len(texts))
    path = resolve_model_path(args.model)
    how = resolve_embedding(
        path,
        pooling=args.pooling,
        normalize=args.normalize,
        query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix,
        trust_remote_code=args.trust_remote_code,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(path)
    backbone = load_backbone(path, trust_remote_code=args.trust_remote_code)
    model = EmbeddingModel(backbone, pooling=how.pooling, normalize=how.normalize)
    model.to(device).eval()
    length = min(args.max_length, how.max_seq_length or args.max_length)
    queries = formats.Tokens(tokenizer, how.query_prefix, length)
    passages = formats.Tokens(tokenizer, how.passage_prefix, length)
    queries.add([r["query"] for r in rows])
    passages.add(list(texts))
    dist, pad = Dist(device), tokenizer.pad_token_id
    q = encode(model, [queries(r["query"]) for r in rows], pad, batch_size=args.batch_size,
               dist=dist)  # fmt: skip
    c = encode(model, [passages(t) for t in texts], pad, batch_size=args.batch_size, dist=dist)
    print(f"fastpref-mine: {len(rows)} queries, {len(texts)} passages, D={c.shape[1]}")
    own = [sorted({texts[t] for t in r["positives"] if t in texts}) for r in rows]
    exclude = torch.full((len(rows), max(1, max(map(len, own)))), -1, dtype=torch.long)
    for i, ids in enumerate(own):
        exclude[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    corpus = list(texts)
    k = args.skip + args.num_negatives
    _, indices = similarity_topk(q.to(device), c.to(device), k, exclude=exclude.to(device))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    short = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r, ranked in zip(rows, indices.tolist(), strict=True):
            mined = [corpus[j] for j in ranked[args.skip :] if j >= 0]
            short += len(mined) < args.num_negatives
            negatives = [*r["negatives"], *mined] if args.keep_negatives else mined
            row = {"query": r["query"], "positives": r["positives"], "negatives": negatives}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    if short:
        print(f"fastpref-mine: {short} queries got fewer than {args.num_negatives} negatives")
    print(f"fastpref-mine: wrote {len(rows)} rows to {out}")
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastpref.errors import InputError

    try:
        mine(args)
    except (InputError, FileNotFoundError) as e:
        print(f"fastpref-mine: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
