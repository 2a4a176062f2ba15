"""The reranker family's data: rank_llm's training conversations and plain ranked lists, the
RankZephyr prompt, passage identifiers, sliding windows, tokenised examples and batches.

Two row formats (one file may mix them), JSON Lines or a JSON array (a ``.json`` file must be a
JSON array, as rank_llm's ``json.load`` reads it):

    conversation  {"conversations": [system, user prompt, assistant target]}
                  turns as {"from": system|human|gpt, "value"} (ShareGPT, rank_llm's data) or
                  {"role": system|user|assistant, "content"}; the user prompt numbers the
                  passages at line starts, ``[A] …``/``[1] …``, and the target is the gold
                  permutation ``"[B] > [A] > …"`` naming every passage once
    plain         {"query", "passages": [text | {"text", "title"?, "docid"?}],
                   "ranking": [passage indices, best first] | "relevance": [integers >= 0]}
                  (+ "qid", "docids"); fastpref writes the prompt itself (``PROMPT``). A ranking
                  may list only the relevant passages: the rest are not relevant.

A list's graded relevance is the given ``relevance``, or from a permutation of K passages the
constant ``K − r`` for gold rank r (0-based) — unlisted passages 0. The gold permutation of a
plain list sorts its passages by relevance (ties in list order). A plain list longer than the
window trains on its sliding windows (``window_spans``) in first-stage order, each with its own
permutation; held-out lists are reranked whole (see ``fastpref.families.reranker``).

Each example is one prompt: ``prompt ids + target ids + [eos]`` for generation/combined, or
``prompt ids + ids of "["`` for ranking, with the position whose next token is the first
identifier (FIRST reads the identifier logits there) and the identifiers' token ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastpref.data import (
    DataError,
    Encoder,
    Row,
    load_records,
    loads_json,
    pad_and_label,
    type_name,
)
from fastpref.errors import ConfigError

__all__ = [
    "COLUMNS",
    "FORMAT",
    "IDENTIFIERS",
    "PROMPT",
    "Identifiers",
    "build_user_prompt",
    "collate",
    "load_rows",
    "target_string",
    "window_spans",
]

FORMAT = "rankllm"
COLUMNS = "conversations, or query, passages, ranking|relevance (+ qid, docids)"
IDENTIFIERS = {
    "alpha": tuple(chr(ord("A") + i) for i in range(26)),
    "numeric": tuple(str(i) for i in range(1, 101)),
}


@dataclass(frozen=True)
class Prompt:
    """RankZephyr's listwise prompt (rank_llm's ``rank_zephyr[_alpha]_template.yaml``); the
    one place fastpref writes it. ``{kind}``/``{example}`` follow the identifiers."""

    system: str = (
        "You are RankLLM, an intelligent assistant that can rank passages based on their "
        "relevancy to the query"
    )
    prefix: str = (
        "I will provide you with {num} passages, each indicated by {kind} identifier []. "
        "Rank the passages based on their relevance to the search query: {query}.\n"
    )
    body: str = "[{identifier}] {passage}\n"
    suffix: str = (
        "Search Query: {query}.\nRank the {num} passages above based on their relevance to the "
        "search query. All the passages should be included and listed using identifiers, in "
        "descending order of relevance. The output format should be [] > [], e.g., {example}, "
        "Answer concisely and directly and only respond with the ranking results, do not say "
        "any word or explain."
    )
    kinds = {"alpha": ("an alphabetical", "[B] > [A]"), "numeric": ("a numerical", "[2] > [1]")}


PROMPT = Prompt()
_MARKER = re.compile(r"^\[([^\[\]\s]+)\]", re.MULTILINE)  # a passage's identifier at line start
_STATED = re.compile(r"provide you with (\d+) passages")
_TARGET = re.compile(r"\s*\[[^\[\]]+\](\s*>\s*\[[^\[\]]+\])*\s*")
_BRACKETED = re.compile(r"\[([A-Za-z]|\d+)\]")  # text that would read as a passage identifier
_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
_ROLES.update(assistant="assistant", model="assistant")


def _clean(text: str) -> str:
    """``[n]`` inside a query or passage becomes ``(n)`` (rank_llm does this for digits), so no
    text can forge a passage identifier."""
    return _BRACKETED.sub(r"(\1)", text)


def build_user_prompt(
    query: str, passages: Sequence[str], identifiers: Sequence[str], kind: str, max_words: int
) -> str:
    """The user turn for ``passages`` (each cut to its first ``max_words`` words)."""
    phrase, example = PROMPT.kinds[kind]
    query = _clean(query)
    n = len(passages)
    body = "".join(
        PROMPT.body.format(identifier=ident, passage=" ".join(_clean(p).split()[:max_words]))
        for ident, p in zip(identifiers, passages, strict=False)
    )
    prefix = PROMPT.prefix.format(num=n, kind=phrase, query=query)
    return prefix + body + PROMPT.suffix.format(num=n, query=query, example=example)


def target_string(identifiers: Sequence[str], order: Sequence[int]) -> str:
    """``"[B] > [A] > …"`` for ``order`` (local passage indices, best first)."""
    return " > ".join(f"[{identifiers[j]}]" for j in order)


def window_spans(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """RankZephyr's sliding windows over ``n`` candidates, from the back of the list to the
    front: ``[n−w, n), [n−w−s, n−s), …`` until a window starts at 0 (n=100, w=20, s=10:
    [80,100), [70,90), …, [0,20)). rank_llm's loop also reranks a last partial window inside the
    previous one (e.g. [0,5) after [0,15) for n=25); this stops at the window that starts at 0."""
    spans, end = [], n
    while True:
        start = max(end - window, 0)
        spans.append((start, end))
        if start == 0:
            return spans
        end -= stride


# ---------------------------------------------------------------------------------------------
# identifiers


class Identifiers:
    """The identifiers of ``--identifiers`` and their token ids, each checked to be one token of
    the tokenizer right after ``"["`` (FIRST reads one logit per identifier there)."""

    def __init__(self, tokenizer: Any, kind: str) -> None:
        if kind not in IDENTIFIERS:
            raise ConfigError(f"--identifiers must be one of {tuple(IDENTIFIERS)}, got {kind!r}")
        self.kind, self.names, self.tokenizer = kind, IDENTIFIERS[kind], tokenizer
        self.open_ids = self._encode("[")
        self._ids: list[int] = []

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokens(self, k: int) -> list[int]:
        """Token ids of the first ``k`` identifiers; ConfigError naming the tokenizer and the
        first identifier that is not a single token (or not a distinct one)."""
        if k > len(self.names):
            raise ConfigError(
                f"{k} passages in one prompt but only {len(self.names)} {self.kind} identifiers"
            )
        name = getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)
        while len(self._ids) < k:
            ident = self.names[len(self._ids)]
            ids = self._encode("[" + ident)
            n = len(self.open_ids)
            if len(ids) != n + 1 or ids[:n] != self.open_ids or ids[n] in self._ids:
                pieces = self.tokenizer.convert_ids_to_tokens(ids)
                other = "numeric" if self.kind == "alpha" else "alpha"
                raise ConfigError(
                    f"identifier [{ident}] is not a single token of the tokenizer {name!r}: "
                    f"'[{ident}' tokenizes as {pieces} (needs '[' then one token of its own); "
                    f"use --identifiers {other}, fewer passages per prompt, or another tokenizer"
                )
            self._ids.append(ids[n])
        return self._ids[:k]


# ---------------------------------------------------------------------------------------------
# reading rows


def _check_json_array(source: str) -> None:
    """A ``.json`` file must hold a JSON array of rows (rank_llm's ``json.load``)."""
    path = Path(source)
    if path.suffix.lower() != ".json" or not path.is_file():
        return
    try:
        obj = loads_json(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is no data
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{source}: not a JSON array of rows (invalid JSON at line {e.lineno}: {e.msg}); "
            "rank_llm's training data is one JSON array, JSON Lines go in a .jsonl file"
        ) from None
    if not isinstance(obj, list):
        raise DataError(f"{source}: expected a JSON array of rows, got a {type_name(obj)}")


def _turns(row: Row) -> list[tuple[str, str]]:
    value = row.get("conversations")
    if not isinstance(value, list) or not value:
        raise row.fail("conversations", f"must be a list of turns, got {type_name(value)}")
    turns = []
    for i, turn in enumerate(value):
        keys = ("from", "value") if isinstance(turn, dict) and "from" in turn else None
        keys = keys or (("role", "content") if isinstance(turn, dict) else None)
        if keys is None or not isinstance(turn.get(keys[1]), str):
            raise row.fail(
                "conversations",
                f'turn {i} is not {{"from", "value"}} or {{"role", "content"}} with text',
            )
        role = _ROLES.get(str(turn.get(keys[0])).lower())
        if role is None:
            raise row.fail("conversations", f"turn {i} has unknown role {turn.get(keys[0])!r:.60}")
        turns.append((role, turn[keys[1]]))
    return turns


def _conversation(row: Row, qid: str, names: tuple[str, ...], kind: str) -> dict:
    turns = _turns(row)
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise row.fail("conversations", "has no assistant turn (the target permutation)")
    users = [i for i, (role, _) in enumerate(turns[:last]) if role == "user"]
    if not users:
        raise row.fail("conversations", "has no user turn (the prompt) before the assistant turn")
    user, target = turns[users[-1]][1], turns[last][1]
    system = next((text for role, text in turns if role == "system"), None)
    markers = _MARKER.findall(user)
    stated = _STATED.search(user)
    if (stated and int(stated.group(1)) > len(names)) or len(markers) > len(names):
        n = max(len(markers), int(stated.group(1)) if stated else 0)
        raise row.fail(
            "conversations",
            f"user prompt has {n} passages, more than the {len(names)} {kind} identifiers",
        )
    for j, mark in enumerate(markers):
        if mark != names[j]:
            raise row.fail(
                "conversations",
                f"user prompt's passage {j + 1} is marked [{mark}], expected [{names[j]}] "
                f"(--identifiers {kind}: [{names[0]}], [{names[1]}], ... in order)",
            )
    if len(markers) < 2:
        raise row.fail("conversations", "user prompt numbers fewer than 2 passages ([A] ...)")
    if not _TARGET.fullmatch(target):
        raise row.fail("conversations", f'assistant target {target[:60]!r} is not "[B] > [A] > …"')
    named = re.findall(r"\[([^\[\]]+)\]", target)
    position = {m: j for j, m in enumerate(markers)}
    seen: set[str] = set()
    for ident in named:
        if ident not in position:
            raise row.fail("conversations", f"target names [{ident}], not a passage of the prompt")
        if ident in seen:
            raise row.fail("conversations", f"target names [{ident}] twice")
        seen.add(ident)
    if len(seen) < len(markers):
        missing = ", ".join(f"[{m}]" for m in markers if m not in seen)
        raise row.fail("conversations", f"target leaves out {missing}; it must rank every passage")
    K = len(markers)
    relevance = [0.0] * K
    for r, ident in enumerate(named):
        relevance[position[ident]] = float(K - r)
    return {
        "kind": "conversation",
        "qid": qid,
        "system": system,
        "user": user,
        "docids": [f"{qid}-{m}" for m in markers],
        "relevance": relevance,
    }


def _passage(row: Row, j: int, value: Any) -> tuple[str, str | None]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        title = value.get("title")
        text = f"Title: {title} Content: {value['text']}" if title else value["text"]
        docid = value.get("docid")
        return text, None if docid is None else str(docid)
    raise row.fail("passages", f'item {j} must be a string or {{"text": str}}, got {value!r:.60}')


def _plain(row: Row, qid: str) -> dict:
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        raise row.fail("query", f"must be a non-empty string, got {type_name(query)}")
    items = row.get("passages")
    if not isinstance(items, list) or len(items) < 2:
        raise row.fail("passages", "must be a list of at least 2 passages")
    parsed = [_passage(row, j, v) for j, v in enumerate(items)]
    n = len(parsed)
    docids = [d if d is not None else f"{qid}-{j}" for j, (_, d) in enumerate(parsed)]
    if row.has("docids"):
        given = row.get("docids")
        if not isinstance(given, list) or len(given) != n:
            raise row.fail("docids", f"must be a list of {n} ids (one per passage)")
        docids = [str(d) for d in given]
    if len(set(docids)) != n:
        raise row.fail("docids" if row.has("docids") else "passages", "repeats a docid")
    if row.has("ranking") == row.has("relevance"):
        raise row.fail("ranking", "or 'relevance' must be given (exactly one of them)")
    if row.has("relevance"):
        rel = row.get("relevance")
        ok = isinstance(rel, list) and len(rel) == n
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rel)
        if not ok:
            raise row.fail("relevance", f"must be a list of {n} integers >= 0 (one per passage)")
        if any(v >= 2**53 for v in rel):  # beyond float's integers (and float(10**400) fails)
            raise row.fail("relevance", "has a grade over 2**53")
        relevance = [float(v) for v in rel]
    else:
        ranking = row.get("ranking")
        if not isinstance(ranking, list) or not ranking:
            raise row.fail("ranking", "must be a non-empty list of passage indices, best first")
        relevance = [0.0] * n
        for r, j in enumerate(ranking):
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < n:
                raise row.fail("ranking", f"item {r} is {j!r:.60}, not a passage index in [0, {n})")
            if relevance[j]:
                raise row.fail("ranking", f"names passage {j} twice")
            relevance[j] = float(len(ranking) - r)
    return {
        "kind": "plain",
        "qid": qid,
        "query": query,
        "passages": [text for text, _ in parsed],
        "docids": docids,
        "relevance": relevance,
    }


def load_rows(source: str, identifiers: str, columns: dict[str, str] | None = None) -> list[dict]:
    """Validated rows of ``source`` (DataError naming the file, the line/row and the field)."""
    _check_json_array(str(source))
    names = IDENTIFIERS[identifiers]
    seen: dict[str, str] = {}  # qid -> where it was first

    def validate(row: Row) -> dict:
        field = "qid" if row.has("qid") else "query_id"
        qid = row.record.get(field)
        if qid is None:
            qid = f"q{len(seen) + 1}"
        elif isinstance(qid, bool) or not isinstance(qid, str | int | float):
            raise row.fail(field, f"must be a string or a number, got {type_name(qid)}")
        qid = str(qid)
        if qid in seen:
            raise row.fail(field, f"{qid[:60]!r} is the qid of {seen[qid]} too")
        seen[qid] = row.where
        if row.has("conversations"):
            return _conversation(row, qid, names, identifiers)
        if row.has("query") or row.has("passages"):
            return _plain(row, qid)
        raise DataError(
            f"{row.where}: expected 'conversations' (rank_llm's format) or 'query' and "
            "'passages' (plain format)"
        )

    return load_records(source, validate, columns=columns)


# ---------------------------------------------------------------------------------------------
# prompts to tokens


def prompt_of(tokenizer: Any, system: str | None, user: str) -> str | list[dict[str, str]]:
    """What ``Encoder.prompt`` renders: ``[system, user]`` messages where the chat template has a
    system role, else one user turn ``system + "\\n " + user`` (rank_llm's rule); plain text for a
    tokenizer without a chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if system is not None and template and "system" in template:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = user if system is None else f"{system}\n {user}"
    return [{"role": "user", "content": text}] if template else text


def collate(examples: Sequence[dict], pad_id: int) -> dict:
    """Right-padded ``input_ids, attention_mask, labels [B, L]`` (labels on the target, see
    ``pad_and_label``), ``first_pos [B]``, ``id_tokens [B, K]`` (0-padded), ``relevance [B, K]``,
    ``mask [B, K]`` (real passages), ``example_ids [B]``, ``tokens`` (target tokens)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    input_ids, attention_mask, labels = pad_and_label(
        [(e["input_ids"], e["prompt_length"]) for e in examples], pad_id
    )
    B, K = len(examples), max(len(e["id_tokens"]) for e in examples)
    id_tokens = torch.zeros((B, K), dtype=torch.long)
    relevance = torch.zeros((B, K), dtype=torch.float32)
    mask = torch.zeros((B, K), dtype=torch.bool)
    for b, e in enumerate(examples):
        k = len(e["id_tokens"])
        id_tokens[b, :k] = torch.tensor(e["id_tokens"])
        relevance[b, :k] = torch.tensor(e["relevance"])
        mask[b, :k] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "first_pos": torch.tensor([e["first_pos"] for e in examples], dtype=torch.long),
        "id_tokens": id_tokens,
        "relevance": relevance,
        "mask": mask,
        "example_ids": torch.tensor([e["example_id"] for e in examples], dtype=torch.long),
    }


class PromptEncoder:
    """Rows and windows to token ids: the prompt (RankZephyr's for plain rows, the row's own for
    conversations), the target permutation and the identifiers, within ``context_size``."""

    def __init__(
        self,
        tokenizer: Any,
        identifiers: Identifiers,
        *,
        max_passage_words: int,
        context_size: int,
        with_target: bool,
    ) -> None:
        self.tok, self.ids = tokenizer, identifiers
        self.enc = Encoder(tokenizer)
        self.max_words, self.context_size, self.with_target = (
            max_passage_words,
            context_size,
            with_target,
        )

    def prompt_ids(self, row: dict, passages: Sequence[int] | None = None) -> list[int]:
        """Prompt ids of a conversation row, or of a plain row's ``passages`` (indices), with
        the passage word cap shrunk (as rank_llm does) until prompt + target fit the context."""
        if row["kind"] == "conversation":
            return self.enc.prompt(prompt_of(self.tok, row["system"], row["user"]))
        words = self.max_words
        # room for the longest target (6 tokens an identifier), with or without one, so that
        # training and reranking see the same prompt
        budget = self.context_size - (6 * len(passages) + 2)
        while True:
            user = build_user_prompt(
                row["query"],
                [row["passages"][j] for j in passages],
                self.ids.names,
                self.ids.kind,
                words,
            )
            ids = self.enc.prompt(prompt_of(self.tok, PROMPT.system, user))
            if len(ids) <= budget or words <= 1:
                return ids
            words = max(1, words - max(1, (len(ids) - budget) // (4 * len(passages))))

    def example(self, row: dict, example_id: int, passages: Sequence[int] | None, where: str):
        """One tokenised prompt of ``row`` (``passages``: a plain row's window, as indices)."""
        k = len(row["docids"]) if passages is None else len(passages)
        relevance = (
            row["relevance"] if passages is None else [row["relevance"][j] for j in passages]
        )
        id_tokens = self.ids.tokens(k)
        prompt = self.prompt_ids(row, passages)
        open_ids = self.ids.open_ids
        if self.with_target:
            order = sorted(range(k), key=lambda j: (-relevance[j], j))
            target = self.enc.completion(target_string(self.ids.names, order)) + [self.enc.eos]
            n = len(open_ids)
            if target[:n] != open_ids or target[n] != id_tokens[order[0]]:
                raise ConfigError(
                    f"{where}: the tokenizer does not split the target permutation into '[' and "
                    "identifier tokens as it splits '[A' alone; FIRST cannot read its logits"
                )
            ids, prompt_length = prompt + target, len(prompt)
        else:  # ranking alone: the prompt and the target's "[", nothing to predict
            ids = prompt + open_ids
            prompt_length = len(ids)
        if len(ids) > self.context_size:
            raise DataError(
                f"{where}: prompt and target are {len(ids)} tokens, over --context-size "
                f"{self.context_size}"
            )
        return {
            "example_id": example_id,
            "input_ids": ids,
            "prompt_length": prompt_length,
            "first_pos": len(prompt) + len(open_ids) - 1,
            "id_tokens": id_tokens,
            "relevance": relevance,
        }
