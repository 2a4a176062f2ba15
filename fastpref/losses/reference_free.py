"""Reference-free pairwise losses: SimPO and CPO (TRL's ``CPOTrainer``), ORPO (``ORPOTrainer``).

No reference model: the implicit reward is the policy's own (scaled) log-probability. The
NLL terms are token means over the whole batch (Σ_b NLL_b / Σ_b tokens_b), which is what
TRL's ``CrossEntropyLoss`` over the concatenated chosen tokens computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._checks import (
    check_finite,
    check_inputs,
    check_label_smoothing,
    check_nonnegative,
    check_positive,
)
from fastpref.losses.metrics import LossMetrics, pair_metrics
from fastpref.losses.pairwise import sigmoid_with_smoothing
from fastpref.losses.types import PairLogps

__all__ = ["cpo", "log1mexp", "orpo", "simpo", "token_mean_nll"]

_POLICY = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")


def token_mean_nll(logps: Tensor, tokens: Tensor) -> Tensor:
    """``−Σ_b logps_b / Σ_b tokens_b``: the per-token NLL over every token of the batch."""
    return -logps.sum() / tokens.sum()


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for x ≤ 0, accurate everywhere.

    ``log(−expm1(x))`` near 0, ``log1p(−exp(x))`` below −ln 2 (Mächler 2012,
    https://cran.r-project.org/package=Rmpfr/vignettes/log1mexp-note.pdf). The branch not
    taken is evaluated on a safe argument so that its gradient cannot be NaN.
    """
    near_zero = x > -math.log(2.0)
    x_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    x_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def simpo(
    inputs: PairLogps,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
) -> tuple[Tensor, LossMetrics]:
    """SimPO: length-normalised, reference-free DPO with a target margin γ.

    ``L = −(1−ε)·log σ(z) − ε·log σ(−z) + α·NLL``, ``z = β·(log π(y_c)/n_c − log π(y_r)/n_r) − γ``.
    Defaults β = 2.0, γ = 1.0 (the paper's γ/β = 0.5 setting; TRL's ``CPOConfig`` defaults
    are β = 0.1, ``simpo_gamma`` = 0.5), ε = 0, α = 0 (pure SimPO; α > 0 is TRL's "CPO-SimPO",
    ``loss_type="simpo"`` with ``cpo_alpha=α``). Rewards are β·(mean token log p).
    Paper: https://arxiv.org/abs/2405.14734.
    """
    check_positive("beta", beta)
    check_finite("gamma", gamma)
    check_label_smoothing(label_smoothing)
    check_nonnegative("alpha", alpha)
    check_inputs(inputs, PairLogps, "simpo", _POLICY)
    chosen_avg = inputs.chosen / inputs.chosen_tokens
    rejected_avg = inputs.rejected / inputs.rejected_tokens
    losses = sigmoid_with_smoothing(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    nll = token_mean_nll(inputs.chosen, inputs.chosen_tokens)
    loss = losses.mean() + alpha * nll if alpha else losses.mean()
    metrics = pair_metrics(
        beta * chosen_avg, beta * rejected_avg, inputs.chosen, inputs.rejected, nll_loss=nll
    )
    return loss, metrics


def cpo(
    inputs: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    alpha: float = 1.0,
) -> tuple[Tensor, LossMetrics]:
    """CPO: reference-free sigmoid preference loss plus α times the NLL of the chosen.

    ``L = mean[−(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)] + α·NLL(y_c)``, ``Δ = log π(y_c) − log π(y_r)``
    (summed log-probs), NLL a token mean over the batch. Defaults β = 0.1, ε = 0, α = 1.0
    (TRL ``CPOConfig``: ``beta``, ``label_smoothing``, ``cpo_alpha``). Rewards are β·log π.
    Paper: https://arxiv.org/abs/2401.08417. TRL ``loss_type="sigmoid"``.
    """
    check_positive("beta", beta)
    check_label_smoothing(label_smoothing)
    check_nonnegative("alpha", alpha)
    check_inputs(inputs, PairLogps, "cpo", _POLICY)
    losses = sigmoid_with_smoothing(beta * (inputs.chosen - inputs.rejected), label_smoothing)
    nll = token_mean_nll(inputs.chosen, inputs.chosen_tokens)
    metrics = pair_metrics(
        beta * inputs.chosen, beta * inputs.rejected, inputs.chosen, inputs.rejected, nll_loss=nll
    )
    return losses.mean() + alpha * nll, metrics


def orpo_terms(inputs: PairLogps, beta: float, loss: str) -> tuple[Tensor, LossMetrics]:
    """ORPO's loss and metrics (shared with rorpo)."""
    check_positive("beta", beta)
    check_inputs(inputs, PairLogps, loss, _POLICY)
    chosen_avg = inputs.chosen / inputs.chosen_tokens
    rejected_avg = inputs.rejected / inputs.rejected_tokens
    # log odds(y) = log p − log(1 − p) with p the geometric-mean token probability; p is capped
    # at 1 − eps so that two certain completions give a finite ratio, not inf − inf
    cap = -torch.finfo(chosen_avg.dtype).eps
    c, r = chosen_avg.clamp(max=cap), rejected_avg.clamp(max=cap)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    nll = token_mean_nll(inputs.chosen, inputs.chosen_tokens)
    metrics = pair_metrics(
        beta * chosen_avg,
        beta * rejected_avg,
        inputs.chosen,
        inputs.rejected,
        nll_loss=nll,
        log_odds_ratio=ratio.mean(),
        log_odds_chosen=log_odds.mean(),
    )
    return nll - beta * ratio.mean(), metrics


def orpo(inputs: PairLogps, *, beta: float = 0.1) -> tuple[Tensor, LossMetrics]:
    """ORPO: NLL of the chosen plus λ times the odds-ratio loss, no reference model.

    ``L = NLL(y_c) − λ·mean log σ(log[odds(y_c)/odds(y_r)])``, ``odds(y) = p/(1 − p)`` with
    ``log p = log π(y)/n`` (length-averaged, as TRL), and ``log(1 − p)`` computed by the
    stable :func:`log1mexp`; log p is capped at −eps(dtype) so that completions the policy is
    certain of (log p = 0 in floating point) give finite log-odds (choice: TRL returns NaN for
    two certain completions). ``beta`` is the paper's λ (TRL's naming). Default 0.1 (TRL
    ``ORPOConfig``). Rewards are β·(mean token log p).
    Paper: https://arxiv.org/abs/2403.07691.
    """
    return orpo_terms(inputs, beta, "orpo")
