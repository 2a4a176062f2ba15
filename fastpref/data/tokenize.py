"""Tokenisation of validated rows into per-role (prompt + completion) id sequences.

Each role of an example is one sequence `prompt_ids + completion_ids + [eos]`:

- prompt and completion are tokenised separately and their ids concatenated, so no BPE merge
  crosses the boundary and the completion's tokens are exactly those of the completion text;
- a string prompt is tokenised with the tokenizer's special tokens (BOS where it has one); a
  chat prompt is rendered with `apply_chat_template(..., add_generation_prompt=True)` and the
  completion is the assistant turn's text;
- when the sequence is longer than `max_length`, the prompt's start is cut first (a leading
  BOS is kept), down to a single prompt token; only then is the completion's end cut. At
  least one prompt token always stays because the first completion token is predicted from
  the position before it;
- an example whose completion text (any role) has no token left is dropped; all drops of
  one call are reported in one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from fastpref.data.formats import check_format

RATIONALE_TEMPLATE = (
    "Question: {prompt}\n"
    "Answer A: {chosen}\n"
    "Answer B: {rejected}\n"
    "Answer A is better than answer B. Why?\n"
)
"""Prompt of the rationale role (rdpo, rorpo): the rationale is scored as the completion of
this text, filled with the row's prompt, chosen and rejected response. A chat prompt is shown
as "role: content" lines."""


def _prompt_text(prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class _Encoder:
    """Caches prompt ids (every role of an example shares its prompt)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no eos_token; set one to mark completion ends")
        # A prompt needs at least one token to predict the first completion token from.
        self.start = self.bos if self.bos is not None else self.eos
        self.cache: dict[Any, list[int]] = {}

    def prompt(self, prompt: str | list[dict[str, str]]) -> list[int]:
        key = (
            prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)
        )
        if key in self.cache:
            return self.cache[key]
        if isinstance(prompt, str):
            ids = list(self.tok(prompt, add_special_tokens=True)["input_ids"])
            if ids and ids[-1] == self.eos:  # tokenizers whose post-processor appends EOS
                ids = ids[:-1]
        else:
            if not getattr(self.tok, "chat_template", None):
                raise ValueError("chat-message rows need a tokenizer with a chat template")
            text = self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        if not ids:
            ids = [self.start]
        self.cache[key] = ids
        return ids

    def completion(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def sequence(
        self, prompt_ids: list[int], text_ids: list[int], max_length: int
    ) -> tuple[list[int], int, int]:
        """(ids, prompt length, completion text tokens kept) after truncation."""
        p, c = prompt_ids, [*text_ids, self.eos]
        if len(p) + len(c) > max_length:
            keep = max(max_length - len(c), 1)
            if keep < len(p):
                head = 1 if p[0] == self.bos and self.bos is not None else 0
                p = p[:keep] if keep <= head else p[:head] + p[len(p) - (keep - head) :]
            c = c[: max(max_length - len(p), 0)]
        return p + c, len(p), min(len(c), len(text_ids))


def _roles(row: dict, fmt: str, rows: Sequence[dict], i: int) -> list[tuple[Any, str]]:
    """(prompt, completion text) of each role of row i, in ROLES order."""
    p = row["prompt"]
    if fmt == "pair":
        return [(p, row["chosen"]), (p, row["rejected"])]
    if fmt == "pair_rationale":
        shown = RATIONALE_TEMPLATE.format(
            prompt=_prompt_text(p), chosen=row["chosen"], rejected=row["rejected"]
        )
        return [(p, row["chosen"]), (p, row["rejected"]), (shown, row["rationale"])]
    if fmt == "kto":
        mismatched = rows[(i + 1) % len(rows)]["completion"]
        return [(p, row["completion"]), (p, mismatched)]
    if fmt == "list":
        return [(p, r) for r in row["responses"]]
    return [(p, row["completion"])]


def tokenize_rows(
    rows: Sequence[dict], fmt: str, tokenizer: Any, *, max_length: int, source: str = ""
) -> list[dict]:
    """Tokenise validated rows (from `load_rows`) of format `fmt` into examples.

    Each example: {"example_id": index in `rows`, "input_ids": [ids of each role],
    "prompt_lengths": [prompt length of each role]} plus "label" (kto), "scores" (list) and
    "margin" (pair formats, when the row has one). Role order is ROLES[fmt]; KTO's "kl" role
    is prompt_i with the completion of row (i + 1) % n; the rationale role's prompt is
    RATIONALE_TEMPLATE. `source` names the data in the drop warning.
    """
    check_format(fmt)
    if max_length < 2:
        raise ValueError(
            f"max_length must be at least 2 (a prompt and a completion token), got {max_length}"
        )
    enc = _Encoder(tokenizer)
    text_ids: dict[str, list[int]] = {}
    examples, dropped = [], 0
    for i, row in enumerate(rows):
        input_ids, prompt_lengths, empty = [], [], False
        for prompt, text in _roles(row, fmt, rows, i):
            if text not in text_ids:
                text_ids[text] = enc.completion(text)
            ids, n_prompt, kept = enc.sequence(enc.prompt(prompt), text_ids[text], max_length)
            empty |= kept == 0
            input_ids.append(ids)
            prompt_lengths.append(n_prompt)
        if empty:
            dropped += 1
            continue
        ex: dict[str, Any] = {
            "example_id": i,
            "input_ids": input_ids,
            "prompt_lengths": prompt_lengths,
        }
        if fmt == "kto":
            ex["label"] = row["label"]
        elif fmt == "list":
            ex["scores"] = list(row["scores"])
        elif "margin" in row:
            ex["margin"] = row["margin"]
        examples.append(ex)
    if dropped:
        warnings.warn(
            f"{source or 'data'}: dropped {dropped} of {len(rows)} examples whose completion is "
            f"empty after truncation to max_length={max_length}",
            stacklevel=2,
        )
    return examples
