"""Tokenisation of validated rows into per-role (prompt + completion) id sequences.

A family says what the roles of a row are (``roles(row, i) -> [(prompt, completion text)]``);
each role of an example becomes one sequence `prompt_ids + completion_ids + [eos]`:

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
from collections.abc import Callable, Sequence
from typing import Any


class Encoder:
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


def tokenize_examples(
    rows: Sequence[dict],
    roles: Callable[[dict, int], list[tuple[Any, str]]],
    tokenizer: Any,
    *,
    max_length: int,
    source: str = "",
    extra: Callable[[dict], dict] | None = None,
) -> list[dict]:
    """Tokenise validated rows into examples, one sequence per role.

    Each example: {"example_id": index in ``rows``, "input_ids": [ids of each role],
    "prompt_lengths": [prompt length of each role], **extra(row)}. ``roles(row, i)`` gives the
    (prompt, completion text) of each role of row i. ``source`` names the data in the warning
    about dropped examples (those whose completion is empty after truncation).
    """
    if max_length < 2:
        raise ValueError(
            f"max_length must be at least 2 (a prompt and a completion token), got {max_length}"
        )
    enc = Encoder(tokenizer)
    text_ids: dict[str, list[int]] = {}
    examples, dropped = [], 0
    for i, row in enumerate(rows):
        input_ids, prompt_lengths, empty = [], [], False
        for prompt, text in roles(row, i):
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
        if extra is not None:
            ex.update(extra(row))
        examples.append(ex)
    if dropped:
        warnings.warn(
            f"{source or 'data'}: dropped {dropped} of {len(rows)} examples whose completion is "
            f"empty after truncation to max_length={max_length}",
            stacklevel=3,
        )
    return examples
