"""One micro-batch: a single concatenated forward of every role -> the loss's inputs -> loss.

A collated batch is role-major (row ``r*B + b`` is role ``r`` of example ``b``; see
``fastpref.data.collate``), so the policy runs once over all ``R*B`` rows and the per-row values
reshape to ``[R, B]``: row 0 chosen / completion, row 1 rejected / KL, row 2 the rationale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastpref.losses import KTOLogps, ListLogps, LossSpec, PairLogps, RewardScores, SFTLogps

__all__ = ["Task", "batch_to_device", "micro_step", "accuracy_parts", "reference_rows"]


@dataclass
class Task:
    """What every step needs to know about the objective (built once in setup)."""

    spec: LossSpec  # the loss from the registry
    hparams: dict[str, object]  # keyword arguments for spec.fn (only those it accepts)
    fmt: str  # data format of spec
    pad_id: int  # tokenizer pad id for collate
    ref_tables: dict[str, Tensor] = field(default_factory=dict)  # split -> [n_examples, R_ref]
    ref_model: nn.Module | None = None  # the frozen reference for --ref-in-pass


def reference_rows(fmt: str, num_roles: int) -> int:
    """How many leading roles have a reference log-prob (the rationale role never does)."""
    return 2 if fmt == "pair_rationale" else num_roles


def batch_to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _reference(task: Task, batch: dict, split: str) -> Tensor | None:
    """Reference Σ log p, ``[R_ref, B]``, from the precomputed table or the in-pass model."""
    if not task.spec.needs_reference:
        return None
    R, B = batch["num_roles"], batch["batch_size"]
    rows = reference_rows(task.fmt, R)
    if task.ref_model is not None:
        with torch.no_grad():
            logps, _ = task.ref_model(
                batch["input_ids"][: rows * B],
                batch["attention_mask"][: rows * B],
                batch["labels"][: rows * B],
            )
        return logps.view(rows, B)
    table = task.ref_tables[split]  # [n, R_ref], moved to the device once in setup
    ref = table[batch["example_ids"]][:, :rows]  # [B, rows] (list: padding columns are 0)
    if ref.shape[1] < rows:
        ref = torch.nn.functional.pad(ref, (0, rows - ref.shape[1]))
    return ref.T.contiguous()


def loss_inputs(task: Task, batch: dict, values: Tensor, tokens: Tensor, ref: Tensor | None):
    """``[R, B]`` policy values (and reference) -> the loss's input dataclass."""
    fmt, kind = task.fmt, task.spec.inputs
    if kind is RewardScores:
        return RewardScores(chosen=values[0], rejected=values[1], margin=batch.get("margin"))
    if kind is SFTLogps:
        return SFTLogps(logps=values[0], tokens=tokens[0])
    if kind is KTOLogps:
        return KTOLogps(
            completion=values[0],
            completion_tokens=tokens[0],
            kl=values[1],
            kl_tokens=tokens[1],
            label=batch["kto_label"],
            ref_completion=None if ref is None else ref[0],
            ref_kl=None if ref is None else ref[1],
        )
    if kind is ListLogps:
        return ListLogps(
            logps=values.T,
            tokens=tokens.T,
            scores=batch["scores"],
            mask=batch["list_mask"],
            ref_logps=None if ref is None else ref.T,
        )
    rationale = fmt == "pair_rationale"
    return PairLogps(
        chosen=values[0],
        rejected=values[1],
        chosen_tokens=tokens[0],
        rejected_tokens=tokens[1],
        ref_chosen=None if ref is None else ref[0],
        ref_rejected=None if ref is None else ref[1],
        rationale=values[2] if rationale else None,
        rationale_tokens=tokens[2] if rationale else None,
    )


def micro_step(task: Task, model: nn.Module, batch: dict, split: str):
    """Forward one micro-batch: returns ``(loss, metrics, values, tokens, ref)``.

    ``values``/``tokens`` are ``[R, B]`` (Σ log p or rewards, and completion-token counts).
    """
    R, B = batch["num_roles"], batch["batch_size"]
    values, tokens = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    values, tokens = values.view(R, B), tokens.view(R, B)
    ref = _reference(task, batch, split)
    loss, metrics = task.spec.fn(loss_inputs(task, batch, values, tokens, ref), **task.hparams)
    return loss, metrics.as_dict(), values, tokens, ref


def _pairwise_correct(margin: Tensor) -> Tensor:
    """1 for a positive margin, ½ for a tie, 0 otherwise (so identical rewards score 0.5)."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def implicit_rewards(task: Task, values: Tensor, tokens: Tensor, ref: Tensor | None) -> Tensor:
    """The reward the objective implicitly ranks by, ``[R_ref, B]``.

    Reference-based: Σ log π − Σ log π_ref (β only scales it). Reference-free (SimPO, CPO,
    ORPO, RORPO) and SFT: the token-mean log-prob. Reward models: the head's value.
    """
    if task.spec.inputs is RewardScores:
        return values
    if ref is not None:
        return values[: ref.shape[0]] - ref
    return values / tokens.clamp(min=1)


def accuracy_parts(
    task: Task, batch: dict, values: Tensor, tokens: Tensor, ref: Tensor | None
) -> tuple[float, float, list]:
    """``(correct, pairs, kto_records)`` for held-out preference accuracy.

    pair formats and rm: pairs = examples, correct = [reward(chosen) > reward(rejected)].
    lipo: every pair (i, j) of a list with score_i > score_j counts, correct when the implicit
    reward orders it the same way. kto (unpaired): returns ``(reward, label)`` records; the
    accuracy is the AUC — the fraction of (desirable, undesirable) pairs across the eval set
    whose rewards are ordered correctly. sft is handled by the evaluator (mismatched completions).
    Ties count ½ everywhere, so a policy equal to its reference scores exactly 0.5.
    """
    rewards = implicit_rewards(task, values, tokens, ref)
    if task.spec.inputs is KTOLogps:
        return 0.0, 0.0, list(zip(rewards[0].tolist(), batch["kto_label"].tolist(), strict=True))
    if task.spec.inputs is ListLogps:
        r, s, m = rewards.T, batch["scores"], batch["list_mask"]  # [B, K]
        pairs = (s[:, :, None] > s[:, None, :]) & m[:, :, None] & m[:, None, :]
        correct = _pairwise_correct(r[:, :, None] - r[:, None, :])
        return float((correct * pairs).sum()), float(pairs.sum()), []
    correct = _pairwise_correct(rewards[0] - rewards[1])
    return float(correct.sum()), float(correct.numel()), []


def kto_auc(records: list) -> float:
    """Fraction of (desirable, undesirable) pairs with the desirable reward higher (ties ½)."""
    pos = torch.tensor([r for r, y in records if y], dtype=torch.float64)
    neg = torch.tensor([r for r, y in records if not y], dtype=torch.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(_pairwise_correct(pos[:, None] - neg[None, :]).mean())
