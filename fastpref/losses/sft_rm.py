"""The first two stages of the DeepSpeed-Chat pipeline: SFT and the Bradley–Terry reward model."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._checks import check_inputs, check_nonnegative
from fastpref.losses.metrics import LossMetrics, pair_metrics
from fastpref.losses.reference_free import token_mean_nll
from fastpref.losses.types import RewardScores, SFTLogps

__all__ = ["rm", "sft"]


def sft(inputs: SFTLogps) -> tuple[Tensor, LossMetrics]:
    """Supervised fine-tuning: negative log-likelihood of the completion, per token.

    ``L = −Σ_b log π(y_b|x_b) / Σ_b n_b`` — the token mean over the whole batch, which is what
    ``F.cross_entropy(logits, labels, ignore_index=-100)`` over the batch's completion tokens
    computes (long completions weigh more than short ones). Stage 1 of the DeepSpeed-Chat /
    InstructGPT pipeline (https://arxiv.org/abs/2203.02155).
    """
    check_inputs(inputs, SFTLogps, "sft", ("logps", "tokens"))
    nll = token_mean_nll(inputs.logps, inputs.tokens)
    return nll, LossMetrics(nll_loss=nll)


def rm(
    inputs: RewardScores, *, center_rewards_coefficient: float = 0.0
) -> tuple[Tensor, LossMetrics]:
    """Bradley–Terry reward-model loss on scalar rewards.

    ``L = mean[−log σ(r_c − r_r − m)] + c·mean[(r_c + r_r)²]`` with an optional per-example
    margin m (Llama 2, https://arxiv.org/abs/2307.09288) and centering coefficient c
    (https://arxiv.org/abs/2312.09244), as TRL's ``RewardTrainer``. Default c = 0 (TRL's
    ``None``). With r_c = r_r and no margin the loss is ln 2.
    Paper: https://arxiv.org/abs/2203.02155 (InstructGPT, Eq. 1).
    """
    check_nonnegative("center_rewards_coefficient", center_rewards_coefficient)
    check_inputs(inputs, RewardScores, "rm", ("chosen", "rejected"))
    diff = inputs.chosen - inputs.rejected
    if inputs.margin is not None:
        diff = diff - inputs.margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((inputs.chosen + inputs.rejected) ** 2).mean()
    return loss, pair_metrics(inputs.chosen, inputs.rejected)
