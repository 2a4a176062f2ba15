"""Reward-model annotation: score (prompt, response) pairs with a sequence-classification model.

Any Hugging Face ``AutoModelForSequenceClassification`` with one output (``num_labels=1``) from a
local path (or a hub name when online) — in particular the one ``fastpref-train --loss rm``
saves. The reward of a pair is the model's output at the last real token of its rendering
(:class:`fastpref.models.RewardScorer`, independent of the padding side). Renderings
(``template``):

- ``chat``: the tokenizer's chat template over a user turn (the prompt) and an assistant turn
  (the response) — the sequence ``fastpref-train`` builds for a chat-message prompt;
- ``plain``: the prompt's tokens with the tokenizer's special tokens (BOS) + the response's
  tokens + EOS — the sequence ``fastpref-train`` builds for a text prompt;
- ``auto`` (default): ``chat`` when the tokenizer has a chat template, else ``plain``.

Prompt and response are tokenized apart, so no merge crosses the boundary; a pair longer than
``max_length`` loses the prompt's start first (a leading BOS stays), then the response's end, as
in the trainer. Pairs are scored in batches sorted by length, on the model's device; every pair
scored is one reward-model call (``calls``), the number AEPO exists to make small.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from fastpref.errors import MissingPathError, ModelError
from fastpref.paths import looks_local

__all__ = ["TEMPLATES", "RewardAnnotator", "render_pair"]

TEMPLATES = ("auto", "chat", "plain")


def _chat_parts(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(head):  # a template that rewrites earlier turns: no clean split
        return "", full
    return head, full[len(head) :]


def render_pair(
    tokenizer, prompt: str, response: str, *, template: str = "auto", max_length: int = 512
) -> list[int]:
    """Token ids of (prompt, response) as the reward model reads them (module docstring)."""
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError("--template chat: the reward model's tokenizer has no chat template")
        head, tail = _chat_parts(tokenizer, prompt, response)
        p = list(tokenizer(head, add_special_tokens=False)["input_ids"]) if head else []
        r = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    elif template == "plain":
        p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if p and eos is not None and p[-1] == eos:  # post-processors that append EOS
            p = p[:-1]
        r = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        r = r + [eos] if eos is not None else r
    else:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if len(p) + len(r) > max_length:
        keep = max(max_length - len(r), 1 if p else 0)
        if keep < len(p):
            head_n = 1 if p and bos is not None and p[0] == bos else 0
            p = p[:keep] if keep <= head_n else p[:head_n] + p[len(p) - (keep - head_n) :]
        r = r[: max(max_length - len(p), 0)]
    ids = p + r
    if not ids:
        raise ValueError("a pair rendered to no tokens")
    return ids


class RewardAnnotator:
    """Scores (prompt, response) pairs with the reward model at ``path``; counts the calls.

    ``device=None``: CUDA when available, else the CPU. ``batch_size`` pairs per forward.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        template: str = "auto",
        max_length: int = 512,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        flag: str = "reward-model",
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from fastpref.models import RewardScorer

        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        source = str(path)
        local = looks_local(source)
        if local and not os.path.exists(os.path.expanduser(source)):
            raise MissingPathError(f"--{flag} {source!r} does not exist")
        kwargs = {"local_files_only": True} if local else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForSequenceClassification.from_pretrained(
                source, trust_remote_code=trust_remote_code, **kwargs
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(
                f"--{flag} {source!r}: cannot load it ({type(e).__name__}: {e})"
            ) from e
        if model.config.num_labels != 1:
            raise ModelError(
                f"--{flag} {source!r}: a reward model has one output (num_labels=1); this one "
                f"has {model.config.num_labels}"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(device=device, dtype=dtype).eval()
        self.scorer = RewardScorer(self.model)
        self.path, self.template, self.max_length = source, template, max_length
        self.batch_size = batch_size
        self.calls = 0  # pairs scored
        self.batches = 0  # forward passes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        progress: bool = False,
        callback: Callable[[int], None] | None = None,
    ) -> list[float]:
        """Reward of each (prompts[i], responses[i]), in order."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        ids = [
            render_pair(self.tokenizer, p, r, template=self.template, max_length=self.max_length)
            for p, r in zip(prompts, responses, strict=True)
        ]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        scores = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="annotating", unit="pair", leave=False)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # right padding
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            reward, _ = self.scorer(input_ids.to(self.device), mask.to(self.device))
            for row, i in enumerate(idx):
                scores[i] = float(reward[row])
            self.calls += len(idx)
            self.batches += 1
            if bar is not None:
                bar.update(len(idx))
            if callback is not None:
                callback(len(idx))
        if bar is not None:
            bar.close()
        return scores
