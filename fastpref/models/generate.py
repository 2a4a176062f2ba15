"""Sampling N responses per prompt from a causal LM (``fastpref-sample``).

Prompts are rendered as the trainer renders them (``template``): ``plain`` is the prompt's tokens
with the tokenizer's special tokens (BOS), the sequence ``fastpref-train --loss sft`` trains a
text prompt with; ``chat`` is the tokenizer's chat template over one user turn with the
generation prompt, for chat models. ``plain`` is the default: a fastpref-trained model has a
chat template in its tokenizer whatever it was trained on, so its presence says nothing.
Batches are left-padded; each prompt yields ``num_responses`` samples
(``generate(do_sample=True, num_return_sequences=N)``), decoded without special tokens and
stripped. The random stream is seeded once with ``seed`` (forked, so the caller's is untouched):
the samples are deterministic for a given seed, batch size and device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["render_prompt", "sample_responses"]


def render_prompt(tokenizer, prompt: str, template: str = "plain") -> list[int]:
    """Token ids a completion of ``prompt`` is generated after (module docstring)."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--template chat: the model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if template != "plain":
        raise ValueError(f"template must be plain or chat, got {template!r}")
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos:  # post-processors that append EOS
        ids = ids[:-1]
    return ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]


@torch.inference_mode()
def sample_responses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_responses: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    template: str = "plain",
    callback: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """``num_responses`` sampled completions of each prompt, ``[len(prompts)][N]`` texts."""
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0 (sampling), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if num_responses < 1:
        raise ValueError(f"--num-responses must be at least 1, got {num_responses}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch = [
                render_prompt(tokenizer, p, template) for p in prompts[start : start + batch_size]
            ]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):  # left padding: generation continues every row
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_responses,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )  # [B·N, width + new]
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for row in range(len(batch)):
                out.append(
                    [t.strip() for t in texts[row * num_responses : (row + 1) * num_responses]]
                )
            if callback is not None:
                callback(len(batch))
    return out
