"""Batching tokenised examples into the padded, role-major tensors the trainer consumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastpref.constants import IGNORE_INDEX

__all__ = ["collate_roles", "pad_and_label"]


def pad_and_label(
    seqs: Sequence[tuple[Sequence[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``(ids, prompt length)`` sequences into ``input_ids, attention_mask, labels``
    ``[N, L]`` long, with labels aligned to the hidden state at the same position, so
    ``sequence_logprobs(hidden, W, labels)`` needs no shift:

        labels[:, t] = input_ids[:, t + 1]  where token t + 1 is a completion token (incl. EOS)
                     = IGNORE_INDEX         elsewhere (prompt, last position, padding)
    """
    L = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(seqs):
        t = torch.as_tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = t
        attention_mask[row, : len(ids)] = 1
        labels[row, n_prompt - 1 : len(ids) - 1] = t[n_prompt:]
    return input_ids, attention_mask, labels


def collate_roles(
    examples: Sequence[dict], pad_id: int, num_roles: int | None = None
) -> dict[str, torch.Tensor | int]:
    """Pad ``examples`` (from ``tokenize_examples``) into one role-major batch.

    Row r*B + b of ``input_ids``, ``attention_mask`` and ``labels`` (see :func:`pad_and_label`)
    is role r of example b (R roles, B examples). ``num_roles=None``: R is the largest role
    count in the batch, and an example with fewer roles is padded with 1-token dummies whose
    labels are all IGNORE_INDEX. Returns input_ids, attention_mask, labels [R*B, L];
    example_ids [B]; num_roles R; batch_size B.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    B = len(examples)
    R = num_roles or max(len(ex["input_ids"]) for ex in examples)
    seqs: list[tuple[list[int], int]] = []  # (ids, prompt length), role-major
    for r in range(R):
        for ex in examples:
            if r < len(ex["input_ids"]):
                seqs.append((ex["input_ids"][r], ex["prompt_lengths"][r]))
            else:
                seqs.append(([pad_id], 1))  # dummy response: no completion token
    input_ids, attention_mask, labels = pad_and_label(seqs, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "example_ids": torch.tensor([ex["example_id"] for ex in examples], dtype=torch.long),
        "num_roles": R,
        "batch_size": B,
    }
