"""The embedding family's data: formats, validation, tokenisation and collation.

Formats (one JSON object per line, or CSV / Parquet / a hub dataset through ``fastpref.data``):

- ``triples`` (stage 1, ``--loss infonce``): RankPO's ``{"query": str, "positives": [str, ...],
  "negatives": [str, ...]}``. A single string is a one-text list. sentence-transformers
  layouts are read too: ``{"anchor", "positive"[, "negative" | "negative_1", "negative_2"...]}``
  (what ``mine_hard_negatives`` writes), and ``--columns`` renames, where ``+`` joins several
  columns into one list (``--columns query=question,positives=answer,negatives=neg_a+neg_b``).
  Every query needs at least one positive and at least ``--num-negatives`` negatives: a row with
  fewer is an error naming it (no silent sampling with replacement, which would count one hard
  negative twice in the softmax); ``--num-negatives 0`` trains on in-batch negatives only.
- ``preference`` (stage 2, ``--loss rankpo``): ``{"query", "passage1", "passage2",
  "preferred": "A" | "B"}`` — "A" prefers passage1.
- ``corpus`` (``--corpus``, the passages a held-out query is ranked among besides those of the
  held-out rows): ``{"text": str}`` per line (other fields are ignored).

Each passage text gets a **key** (a 64-bit hash of the text, never 0): equal texts, equal keys,
which is how a passage that is one of a query's positives is recognised wherever it turns up in
a batch (``fastpref.losses.infonce_loss`` never counts it as a negative).

Stage-1 batches draw one positive per query and ``--num-negatives`` of its negatives without
replacement from a ``random.Random(--seed)`` owned by the run; held-out batches take the first
positive and the first negatives (deterministic). Queries and passages are tokenised separately
(``--query-prefix`` / ``--passage-prefix`` prepended, each side cut at its own max length) and
right-padded.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from fastpref.data import Row, load_records, loads_json, type_name
from fastpref.errors import ConfigError, DataError

__all__ = [
    "COLUMNS",
    "FIELDS",
    "TRIPLES",
    "PREFERENCE",
    "collate",
    "load_corpus",
    "load_rows",
    "text_key",
    "tokenize_rows",
]

TRIPLES, PREFERENCE = "triples", "preference"
FIELDS = {
    TRIPLES: ("query", "positives", "negatives"),
    PREFERENCE: ("query", "passage1", "passage2", "preferred"),
}
COLUMNS = {  # for --help
    TRIPLES: "query, positives[], negatives[] (or anchor, positive, negative[_N])",
    PREFERENCE: "query, passage1, passage2, preferred (A|B)",
}
_NEGATIVE_COLUMN = re.compile(r"^negative(?:_(\d+))?$")


def text_key(text: str) -> int:
    """A passage text's identity: a signed 64-bit BLAKE2b hash, never 0 (0 pads key tensors)."""
    key = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    key = key - (1 << 64) if key >= 1 << 63 else key
    return key or 1


# ---------------------------------------------------------------------------------------------
# validation


def _columns(row: Row, field: str) -> list[str]:
    return row.columns.get(field, field).split("+")


def _present(row: Row, field: str) -> bool:
    return all(row.record.get(c) is not None for c in _columns(row, field))


def _texts(row: Row, field: str) -> list[str]:
    """The field as a list of strings (a string is a one-text list; ``a+b`` joins columns)."""
    out: list[str] = []
    for column in _columns(row, field):
        value = row.record.get(column)
        name = f"'{column}'" if column == field else f"'{column}' ({field})"
        if value is None:
            raise DataError(f"{row.where}: field {name} is missing")
        if row.from_text and isinstance(value, str) and value.lstrip().startswith("["):
            try:  # a CSV cell holding a JSON list
                parsed = loads_json(value)
            except json.JSONDecodeError:
                parsed = None
            value = parsed if isinstance(parsed, list) else value
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            for k, item in enumerate(value):
                if not isinstance(item, str):
                    raise DataError(
                        f"{row.where}: field {name} item {k} must be a string, "
                        f"got {type_name(item)}"
                    )
                out.append(item)
        else:
            raise DataError(
                f"{row.where}: field {name} must be a string or a list of strings, "
                f"got {type_name(value)}"
            )
    return out


def _string(row: Row, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise row.fail(field, f"must be a string, got {type_name(value)}")
    return value


def _sentence_transformers_layout(row: Row) -> Row:
    """``anchor/positive/negative[_n]`` columns renamed to query/positives/negatives."""
    record = row.record
    if row.columns or "query" in record or "anchor" not in record:
        return row
    negatives = sorted(
        (int(m.group(1) or 0), k) for k in record if (m := _NEGATIVE_COLUMN.match(k))
    )
    columns = {"query": "anchor", "positives": "positive"}
    if negatives:
        columns["negatives"] = "+".join(k for _, k in negatives)
    return Row(record, row.where, columns, row.from_text, row.list_fields)


def validate_triples(row: Row, num_negatives: int) -> dict[str, Any]:
    row = _sentence_transformers_layout(row)
    query = _string(row, "query")
    positives = _texts(row, "positives")
    if not positives:
        raise row.fail("positives", "is an empty list; every query needs at least one positive")
    negatives = _texts(row, "negatives") if _present(row, "negatives") else []
    if len(negatives) < num_negatives:
        raise row.fail(
            "negatives",
            f"has {len(negatives)} texts, fewer than --num-negatives {num_negatives} (each query "
            "trains on that many distinct hard negatives; pass a smaller --num-negatives, "
            "0 for in-batch negatives only)",
        )
    return {"query": query, "positives": positives, "negatives": negatives}


def validate_preference(row: Row) -> dict[str, Any]:
    query = _string(row, "query")
    first, second = _string(row, "passage1"), _string(row, "passage2")
    preferred = row.get("preferred")
    if preferred not in ("A", "B"):
        raise row.fail(
            "preferred", f'must be "A" (passage1) or "B" (passage2), got {preferred!r:.60}'
        )
    chosen, rejected = (first, second) if preferred == "A" else (second, first)
    return {"query": query, "chosen": chosen, "rejected": rejected}


def load_rows(
    source: str, fmt: str, *, columns: dict[str, str] | None, num_negatives: int = 0
) -> list[dict]:
    """Validated rows of ``source`` in format ``fmt`` (DataError: file, line, field)."""
    unknown = sorted(set(columns or {}) - set(FIELDS[fmt]))
    if unknown:
        raise ConfigError(
            f"--columns names {', '.join(map(repr, unknown))}, not a field of format {fmt!r} "
            f"(its fields: {', '.join(FIELDS[fmt])})"
        )
    if fmt == TRIPLES:
        return load_records(
            source,
            lambda row: validate_triples(row, num_negatives),
            columns=columns,
            list_fields=("positives", "negatives"),
        )
    return load_records(source, validate_preference, columns=columns)


def load_corpus(source: str) -> list[str]:
    """The ``text`` of every row of a corpus file."""
    return load_records(source, lambda row: _string(row, "text"))


# ---------------------------------------------------------------------------------------------
# tokenisation


class Tokens:
    """Token ids of texts, each distinct text tokenised once (in one batched call per side)."""

    def __init__(self, tokenizer, prefix: str, max_length: int) -> None:
        self.tokenizer, self.prefix, self.max_length = tokenizer, prefix, max_length
        self.ids: dict[str, list[int]] = {}

    def add(self, texts: Sequence[str]) -> None:
        new = list(dict.fromkeys(t for t in texts if t not in self.ids))
        if not new:
            return
        encoded = self.tokenizer(
            [self.prefix + t for t in new], truncation=True, max_length=self.max_length
        )["input_ids"]
        self.ids.update(zip(new, (list(e) for e in encoded), strict=True))

    def __call__(self, text: str) -> list[int]:
        return self.ids[text]


def tokenize_rows(
    rows: Sequence[dict], fmt: str, queries: Tokens, passages: Tokens, split: str
) -> list[dict]:
    """Examples: ``{"example_id", "split", "query": ids, ...}`` with, for ``triples``,
    ``positives`` / ``negatives`` (lists of ids) and their text keys; for ``preference``,
    ``chosen`` / ``rejected`` ids."""
    queries.add([r["query"] for r in rows])
    fields = ("positives", "negatives") if fmt == TRIPLES else ("chosen", "rejected")
    texts: list[str] = []
    for r in rows:
        for f in fields:
            texts.extend(r[f] if fmt == TRIPLES else [r[f]])
    passages.add(texts)
    examples = []
    for i, r in enumerate(rows):
        ex: dict[str, Any] = {"example_id": i, "split": split, "query": queries(r["query"])}
        if fmt == TRIPLES:
            for f in fields:
                ex[f] = [passages(t) for t in r[f]]
                ex[f"{f}_keys"] = [text_key(t) for t in r[f]]
        else:
            ex["chosen"], ex["rejected"] = passages(r["chosen"]), passages(r["rejected"])
        examples.append(ex)
    return examples


# ---------------------------------------------------------------------------------------------
# collation


def pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[N, T]`` ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[n, : len(s)] = 1
    return ids, mask


def collate(
    examples: Sequence[dict], fmt: str, pad_id: int, *, num_negatives: int, rng: random.Random
) -> dict:
    """One micro-batch.

    triples: ``query_ids/query_mask [B, Tq]``, ``passage_ids/passage_mask [B·G, Tp]`` in group
    layout (positive, then ``num_negatives`` hard negatives per query), ``passage_keys [B·G]``,
    ``positive_keys [B, P]`` (all of each query's positives, 0-padded). preference:
    ``passage_ids`` holds the B chosen then the B rejected passages. Both: ``example_ids [B]``.
    """
    B = len(examples)
    query_ids, query_mask = pad([e["query"] for e in examples], pad_id)
    batch: dict[str, Any] = {
        "example_ids": torch.tensor([e["example_id"] for e in examples], dtype=torch.long),
        "query_ids": query_ids,
        "query_mask": query_mask,
        "batch_size": B,
    }
    if fmt == PREFERENCE:
        seqs = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        batch["passage_ids"], batch["passage_mask"] = pad(seqs, pad_id)
        return batch
    seqs, keys = [], []
    for e in examples:
        held_out = e["split"] != "train"
        p = 0 if held_out else rng.randrange(len(e["positives"]))
        n = len(e["negatives"])
        negs = list(range(num_negatives)) if held_out else rng.sample(range(n), num_negatives)
        seqs += [e["positives"][p], *(e["negatives"][j] for j in negs)]
        keys += [e["positives_keys"][p], *(e["negatives_keys"][j] for j in negs)]
    width = max(len(e["positives_keys"]) for e in examples)
    positive_keys = torch.zeros((B, width), dtype=torch.long)
    for i, e in enumerate(examples):
        positive_keys[i, : len(e["positives_keys"])] = torch.tensor(e["positives_keys"])
    batch["passage_ids"], batch["passage_mask"] = pad(seqs, pad_id)
    batch["passage_keys"] = torch.tensor(keys, dtype=torch.long)
    batch["positive_keys"] = positive_keys
    batch["group_size"] = 1 + num_negatives
    return batch
