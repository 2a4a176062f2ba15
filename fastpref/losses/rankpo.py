"""RankPO stage 2: DPO-style preference optimisation of an embedding model (arXiv 2503.10723)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._checks import (
    check_choice,
    check_finite,
    check_inputs,
    check_label_smoothing,
    check_nonnegative,
    check_positive,
)
from fastpref.losses.metrics import LossMetrics, pair_metrics
from fastpref.losses.pairwise import sigmoid_with_smoothing
from fastpref.losses.types import RankPOScores

__all__ = ["rankpo"]

_LOSS_TYPES = ("sigmoid", "hinge")


def rankpo(
    inputs: RankPOScores,
    *,
    tau: float = 0.02,
    beta: float = 1.0,
    gamma: float = 0.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    reference_free: bool = False,
) -> tuple[Tensor, LossMetrics]:
    """RankPO loss on cosine scores of a query with a preferred and an other passage.

    ``a = (s_c − s_r) − (s_c_ref − s_r_ref)`` (the reference part only when
    ``reference_free=False``), ``z = β·(a/τ − γ)``; per pair
    ``sigmoid``: ``−(1−ε)·log σ(z) − ε·log σ(−z)``, ``hinge``: ``max(0, 1 − z)``; plus
    ``sft_weight`` times the 2-way cross-entropy ``−log softmax([s_c, s_r]/τ)[0] =
    softplus((s_r − s_c)/τ)`` (the stage-1 contrastive loss on the pair). Means over the batch.
    Defaults follow the released code (github.com/yflyzhang/RankPO ``RankPOArguments``):
    τ = 0.02, β = 1.0, γ = 0 (its ``gamma_beta_ratio``), sigmoid, ε = 0, sft_weight = 0,
    reference-based. ε applies to ``sigmoid`` only (a non-zero ε with ``hinge`` is an error;
    the released code ignores it with a warning). Rewards are β·(s − s_ref).
    Paper: https://arxiv.org/abs/2503.10723.
    """
    check_positive("tau", tau)
    check_positive("beta", beta)
    check_finite("gamma", gamma)
    check_choice("loss_type", loss_type, _LOSS_TYPES)
    check_label_smoothing(label_smoothing)
    if loss_type == "hinge" and label_smoothing:
        raise ValueError("label_smoothing must be 0 with loss_type='hinge' (sigmoid only)")
    check_nonnegative("sft_weight", sft_weight)
    required = (
        ("chosen", "rejected")
        if reference_free
        else ("chosen", "rejected", "ref_chosen", "ref_rejected")
    )
    check_inputs(inputs, RankPOScores, "rankpo", required)
    chosen, rejected = inputs.chosen, inputs.rejected
    if reference_free:
        ref_chosen = ref_rejected = torch.zeros_like(chosen)
    else:
        ref_chosen, ref_rejected = inputs.ref_chosen, inputs.ref_rejected
    advantage = (chosen - rejected) - (ref_chosen - ref_rejected)
    z = beta * (advantage / tau - gamma)
    if loss_type == "sigmoid":
        losses = sigmoid_with_smoothing(z, label_smoothing)
    else:
        losses = torch.relu(1 - z)
    loss = losses.mean()
    sft = F.softplus((rejected - chosen) / tau).mean()
    if sft_weight:
        loss = loss + sft_weight * sft
    with torch.no_grad():
        chosen_rewards = beta * (chosen - ref_chosen)
        rejected_rewards = beta * (rejected - ref_rejected)
    return loss, pair_metrics(chosen_rewards, rejected_rewards, sft_loss=sft)
