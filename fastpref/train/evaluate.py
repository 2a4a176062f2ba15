"""Held-out evaluation: eval loss, the loss's metrics, and preference accuracy.

Preference accuracy is how often the objective's implicit reward ranks the better response
first (ties count ½, so a policy equal to its reference scores 0.5):
- pair losses (dpo family, simpo, cpo, orpo, rdpo, rorpo): reward(chosen) > reward(rejected),
  reward = Σ log π − Σ log π_ref with a reference, else the token-mean log π;
- rm: head(prompt + chosen) > head(prompt + rejected);
- lipo: over every pair of responses of a list with different scores;
- kto (unpaired): AUC — over all (desirable, undesirable) pairs of the eval set;
- sft (no rejected response): log π(completion_i | prompt_i) above log π(completion_i | prompt_j),
  the same completion after the next eval example's (different) prompt — did the model learn to
  condition on the prompt? (Same tokens scored twice, so the completion's own likelihood cancels.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastpref.train.step import Task, accuracy_parts, batch_to_device, kto_auc, micro_step

__all__ = ["evaluate", "mismatched_completions"]

IGNORE_INDEX = -100


def _prompt_completion(example: dict, fmt: str, pad_id: int) -> tuple[Tensor, Tensor]:
    from fastpref.data import collate

    batch = collate([example], fmt, pad_id)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    ids = ids[batch["attention_mask"][0].bool()]
    first = int(
        (labels != IGNORE_INDEX).nonzero()[0]
    )  # labels[t] = ids[t+1], first completion token
    return ids[: first + 1], ids[first + 1 :]


def mismatched_completions(examples: list[dict], fmt: str, pad_id: int) -> list[tuple[Tensor, int]]:
    """For sft: (prompt_j + completion_i, len(prompt_j)) for every eval example i, where j is the
    next example (cyclically) whose prompt differs from prompt_i (i itself if none does)."""
    parts = [_prompt_completion(e, fmt, pad_id) for e in examples]
    n, out = len(parts), []
    for i, (own, completion) in enumerate(parts):
        others = (parts[(i + k) % n][0] for k in range(1, n))
        prompt = next((p for p in others if not torch.equal(p, own)), own)
        out.append((torch.cat([prompt, completion]), len(prompt)))
    return out


def _collate_sequences(seqs: list[tuple[Tensor, int]], pad_id: int) -> dict:
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, (s, prompt_len) in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = s, 1
        labels[b, prompt_len - 1 : len(s) - 1] = s[prompt_len:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def evaluate(
    task: Task,
    model,
    examples: list[dict],
    mismatched: list | None,
    *,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """``{"eval/loss", "eval/accuracy", "eval/<metric>"...}`` over ``examples`` (all ranks)."""
    from fastpref.data import collate

    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    correct = pairs = 0.0
    records: list = []
    step = batch_size * world_size
    for start in range(0, len(examples), step):
        idx = list(range(start, min(start + step, len(examples))))[
            rank * batch_size : (rank + 1) * batch_size
        ]
        weight = 1.0
        if not idx:  # every rank must run the forward (ZeRO-3 gathers collectively)
            idx, weight = [start], 0.0
        batch = batch_to_device(collate([examples[i] for i in idx], task.fmt, task.pad_id), device)
        loss, metrics, values, tokens, ref = micro_step(task, model, batch, "eval")
        n = weight * len(idx)
        for key, value in {"loss": loss, **metrics}.items():
            v = float(value)
            if math.isfinite(v):
                sums[key] = sums.get(key, 0.0) + v * n
                counts[key] = counts.get(key, 0.0) + n
        if mismatched is not None:  # sft: own prompt vs another example's prompt
            other = batch_to_device(
                _collate_sequences([mismatched[i] for i in idx], task.pad_id), device
            )
            wrong, _ = model(other["input_ids"], other["attention_mask"], other["labels"])
            margin = values[0] - wrong  # the same completion tokens under two prompts
            c = (margin > 0).float() + 0.5 * (margin == 0).float()
            correct, pairs = correct + weight * float(c.sum()), pairs + weight * len(idx)
        elif weight:
            c, p, recs = accuracy_parts(task, batch, values, tokens, ref)
            correct, pairs, records = correct + c, pairs + p, records + recs
    local = (sums, counts, correct, pairs, records)
    parts = [local]
    if world_size > 1:
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, local)
    total_sums: dict[str, float] = {}
    total_counts: dict[str, float] = {}
    for s, c, *_ in parts:
        for k in s:
            total_sums[k] = total_sums.get(k, 0.0) + s[k]
            total_counts[k] = total_counts.get(k, 0.0) + c[k]
    out = {f"eval/{k}": total_sums[k] / total_counts[k] for k in total_sums if total_counts[k]}
    if task.fmt == "kto" and mismatched is None:
        out["eval/accuracy"] = kto_auc([r for p in parts for r in p[4]])
    else:
        total_pairs = sum(p[3] for p in parts)
        out["eval/accuracy"] = (
            sum(p[2] for p in parts) / total_pairs if total_pairs else float("nan")
        )
    model.train()
    return out
