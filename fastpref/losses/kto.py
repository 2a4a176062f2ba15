"""KTO: Kahneman–Tversky optimisation on unpaired desirable/undesirable completions."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastpref.losses._checks import check_inputs, check_nonnegative, check_positive
from fastpref.losses.metrics import LossMetrics
from fastpref.losses.types import KTOLogps

__all__ = ["kto", "kto_reference_point"]

_REQUIRED = (
    "completion",
    "completion_tokens",
    "kl",
    "kl_tokens",
    "label",
    "ref_completion",
    "ref_kl",
)


def kto_reference_point(kl_logratios: Tensor) -> Tensor:
    """z₀ = max(0, mean(log π(y'|x) − log π_ref(y'|x))) over mismatched pairs, detached.

    When ``torch.distributed`` is initialised the per-process means are averaged over all
    processes (an all-reduce), as TRL's ``gather_for_metrics(kl).mean()`` does, so every
    process uses the same z₀.
    """
    z0 = kl_logratios.detach().mean()
    if dist.is_available() and dist.is_initialized():
        z0 = z0.clone()
        dist.all_reduce(z0, op=dist.ReduceOp.SUM)
        z0 = z0 / dist.get_world_size()
    return z0.clamp(min=0)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    # NaN for an empty subset (0/0), without a host sync
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum()


def kto(
    inputs: KTOLogps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, LossMetrics]:
    """KTO loss with the batch KL reference point.

    With ``r = log π(y|x) − log π_ref(y|x)`` and z₀ from :func:`kto_reference_point`::

        desirable:   λ_D·(1 − σ(β·(r − z₀)))
        undesirable: λ_U·(1 − σ(β·(z₀ − r)))

    averaged over the B examples. z₀ is estimated from mismatched (prompt_i, completion_j)
    pairs, detached and clamped at 0. Defaults β = 0.1, λ_D = λ_U = 1.0 (TRL ``KTOConfig``).
    Rewards are β·r; ``rewards/chosen``/``rejected`` average over the desirable/undesirable
    examples (NaN when the batch has none); there is no accuracy for unpaired data.
    Paper: https://arxiv.org/abs/2402.01306 (Eq. 7). TRL ``loss_type="kto"``.
    """
    check_positive("beta", beta)
    check_nonnegative("desirable_weight", desirable_weight)
    check_nonnegative("undesirable_weight", undesirable_weight)
    check_inputs(inputs, KTOLogps, "kto", _REQUIRED)
    if inputs.label.dtype != torch.bool:
        raise ValueError(f"kto: KTOLogps.label must be a bool tensor, got {inputs.label.dtype}")
    z0 = kto_reference_point(inputs.kl - inputs.ref_kl)
    logratio = inputs.completion - inputs.ref_completion
    desirable = inputs.label
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))),
    )
    with torch.no_grad():
        rewards = beta * logratio
        chosen = _masked_mean(rewards, desirable)
        rejected = _masked_mean(rewards, ~desirable)
        metrics = LossMetrics(
            rewards_chosen=chosen,
            rewards_rejected=rejected,
            rewards_margins=chosen - rejected,
            logps_chosen=_masked_mean(inputs.completion, desirable),
            logps_rejected=_masked_mean(inputs.completion, ~desirable),
            kl=z0,
        )
    return losses.mean(), metrics
