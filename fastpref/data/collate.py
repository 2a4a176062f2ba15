"""Batching tokenised examples into the padded, role-major tensors the trainer consumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastpref.data.formats import ROLES, check_format


def collate(examples: Sequence[dict], fmt: str, pad_id: int) -> dict[str, torch.Tensor | int]:
    """Pad `examples` (from `tokenize_rows`) into one role-major batch.

    Row r*B + b of `input_ids`, `attention_mask` and `labels` is role r of example b (R roles,
    B examples), right-padded with `pad_id` to the longest sequence L. Labels are aligned with
    the hidden state at the same position, so `sequence_logprobs(hidden, W, labels)` needs no
    shift:

        labels[:, t] = input_ids[:, t + 1]  where token t + 1 is a completion token (incl. EOS)
                     = -100                 elsewhere (prompt, last position, padding)

    "list": R = K, the longest response list in the batch; shorter lists are padded with
    1-token dummies whose labels are all -100 and whose `list_mask` is False.
    Returns input_ids, attention_mask, labels [R*B, L] long; example_ids [B] long;
    num_roles R; batch_size B; plus kto_label [B] bool (kto), scores [B, K] float and
    list_mask [B, K] bool (list), margin [B] float (pair formats, when every example has one).
    """
    check_format(fmt)
    if not examples:
        raise ValueError("collate needs at least one example")
    B = len(examples)
    roles = ROLES[fmt]
    R = max(len(ex["input_ids"]) for ex in examples) if roles is None else len(roles)
    seqs: list[tuple[list[int], int]] = []  # (ids, prompt length), role-major
    for r in range(R):
        for ex in examples:
            if r < len(ex["input_ids"]):
                seqs.append((ex["input_ids"][r], ex["prompt_lengths"][r]))
            else:
                seqs.append(([pad_id], 1))  # dummy response: no completion token
    L = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((R * B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((R * B, L), dtype=torch.long)
    labels = torch.full((R * B, L), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(seqs):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = t
        attention_mask[row, : len(ids)] = 1
        labels[row, n_prompt - 1 : len(ids) - 1] = t[n_prompt:]
    batch: dict[str, torch.Tensor | int] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "example_ids": torch.tensor([ex["example_id"] for ex in examples], dtype=torch.long),
        "num_roles": R,
        "batch_size": B,
    }
    if fmt == "kto":
        batch["kto_label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
    elif fmt == "list":
        scores = torch.zeros((B, R), dtype=torch.float32)
        mask = torch.zeros((B, R), dtype=torch.bool)
        for b, ex in enumerate(examples):
            k = len(ex["scores"])
            scores[b, :k] = torch.tensor(ex["scores"], dtype=torch.float32)
            mask[b, :k] = True
        batch["scores"], batch["list_mask"] = scores, mask
    elif all("margin" in ex for ex in examples):
        batch["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float32)
    return batch
