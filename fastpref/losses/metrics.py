"""What every objective reports next to its loss, under the names TRL users know."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["LossMetrics", "pair_metrics", "pairwise_correct"]

# field name -> logged name (TRL's, where TRL has one)
_NAMES = {
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "rewards_accuracies": "rewards/accuracies",
    "rewards_margins": "rewards/margins",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
    "logps_rationale": "logps/rationale",
    "nll_loss": "nll_loss",
    "log_odds_ratio": "log_odds_ratio",
    "log_odds_chosen": "log_odds_chosen",
    "rationale_nll": "rationale_nll",
    "kl": "kl",
    "sft_loss": "sft_loss",
    "rank_loss": "rank_loss",
}


@dataclass
class LossMetrics:
    """Batch means of what a loss saw, as detached 0-dim tensors; ``None`` when not reported.

    Values stay on the device (no host sync); the trainer decides when to read them. A mean
    over an empty subset (e.g. KTO's ``rewards/chosen`` in a batch with no desirable example)
    is NaN, so that averaging over steps with ``nanmean`` stays correct.
    """

    rewards_chosen: Tensor | None = None  # mean implicit reward of the chosen/desirable/best
    rewards_rejected: Tensor | None = None  # ... of the rejected/undesirable/worst
    rewards_accuracies: Tensor | None = None  # fraction of pairs ordered correctly (ties ½)
    rewards_margins: Tensor | None = None  # mean(chosen reward - rejected reward)
    logps_chosen: Tensor | None = None  # mean policy log p of the chosen completion
    logps_rejected: Tensor | None = None
    logps_rationale: Tensor | None = None  # mean Σ log p of the rationale (rdpo/rorpo)
    nll_loss: Tensor | None = None  # token-mean NLL of the chosen completion (sft/cpo/orpo)
    log_odds_ratio: Tensor | None = None  # ORPO: mean log σ(log odds ratio)
    log_odds_chosen: Tensor | None = None  # ORPO: mean log odds ratio
    rationale_nll: Tensor | None = None  # token-mean NLL of the rationale
    kl: Tensor | None = None  # KTO: the reference point z0
    sft_loss: Tensor | None = None  # RankPO: the 2-way cross-entropy term
    rank_loss: Tensor | None = None  # RankLLM: the ranking term L_rank (before λ)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                setattr(self, f.name, value.detach())

    def as_dict(self) -> dict[str, Tensor]:
        """``{TRL name: value}`` for the fields that are set."""
        return {
            _NAMES[f.name]: value
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None
        }


def pairwise_correct(margin: Tensor) -> Tensor:
    """1 for a positive margin, ½ for a tie, 0 otherwise — the one rule by which every accuracy
    of fastpref counts a pair (so identical rewards score exactly 0.5)."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def pair_metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_logps: Tensor | None = None,
    rejected_logps: Tensor | None = None,
    *,
    accuracies: Tensor | None = None,
    **extra: Tensor,
) -> LossMetrics:
    """The metrics every pairwise loss reports, from per-example rewards (and log-probs).

    ``accuracies`` defaults to the fraction of examples with chosen reward > rejected reward,
    ties ½ (as the held-out accuracy counts them); a listwise loss passes its own (ordered pairs
    over all pairs).
    """
    with torch.no_grad():
        if accuracies is None:
            accuracies = pairwise_correct(chosen_rewards - rejected_rewards).mean()
        return LossMetrics(
            rewards_chosen=chosen_rewards.mean(),
            rewards_rejected=rejected_rewards.mean(),
            rewards_accuracies=accuracies,
            rewards_margins=(chosen_rewards - rejected_rewards).mean(),
            logps_chosen=None if chosen_logps is None else chosen_logps.mean(),
            logps_rejected=None if rejected_logps is None else rejected_logps.mean(),
            **extra,
        )
