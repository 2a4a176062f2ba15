"""Preference learning with rationales: RDPO and RORPO (arXiv 2407.14477).

A rationale r explains why y_c is preferred; the model is prompted with
(x, y_c, y_r) and trained to also explain the preference. Both losses add a γ-weighted term
on the policy's log-likelihood of the rationale, ``log π(r | x, y_c, y_r)``, to a standard
preference loss. Only the policy's rationale log-likelihood is used (no reference term).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._checks import (
    check_choice,
    check_inputs,
    check_nonnegative,
    check_positive,
)
from fastpref.losses.metrics import LossMetrics
from fastpref.losses.pairwise import dpo
from fastpref.losses.reference_free import orpo_terms
from fastpref.losses.types import PairLogps

__all__ = ["rdpo", "rorpo"]

_RATIONALE_TERMS = ("nll", "logsigmoid")


def _with_rationale(metrics: LossMetrics, inputs: PairLogps) -> LossMetrics:
    metrics.logps_rationale = inputs.rationale.detach().mean()
    metrics.rationale_nll = (-inputs.rationale.sum() / inputs.rationale_tokens.sum()).detach()
    return metrics


def _check_rationale(inputs: PairLogps, loss: str) -> None:
    check_inputs(inputs, PairLogps, loss, ("chosen", "rationale", "rationale_tokens"))


def rdpo(
    inputs: PairLogps,
    *,
    beta: float = 0.1,
    gamma: float = 1.0,
    rationale_term: str = "nll",
) -> tuple[Tensor, LossMetrics]:
    """RDPO: DPO plus γ times a rationale likelihood term.

    ``L = mean[−log σ(β·h)] + γ·mean[NLL(r)]`` with ``NLL(r) = −log π(r | x, y_c, y_r)``
    (summed over the rationale's tokens) — the paper's form, ``rationale_term="nll"``.

    ``rationale_term="logsigmoid"`` is the authors' released code instead:
    ``L = mean[−log σ(β·h) − log σ(γ·log π(r|·))]``. The difference: −log σ(γ·ℓ) =
    softplus(−γ·ℓ) behaves like the NLL term (≈ −γ·ℓ) while the rationale is unlikely, but its
    gradient is damped by σ(−γ·ℓ) ∈ (½, 1) and it does not reach 0 as ℓ → 0 (it tends to ln 2),
    so it saturates instead of pulling the rationale's likelihood up linearly. With γ = 0 both
    forms are DPO (the logsigmoid form plus the constant ln 2).
    Defaults β = 0.1 (as DPO), γ = 1.0 (our choice; the paper tunes γ per dataset).
    Paper: https://arxiv.org/abs/2407.14477;
    code: https://github.com/reds-lab/preference-learning-with-rationales (``RDPOTrainer``).
    """
    check_nonnegative("gamma", gamma)
    check_choice("rationale_term", rationale_term, _RATIONALE_TERMS)
    _check_rationale(inputs, "rdpo")
    loss, metrics = dpo(inputs, beta=beta)
    if rationale_term == "nll":
        term = -gamma * inputs.rationale
    else:
        term = -F.logsigmoid(gamma * inputs.rationale)
    return loss + term.mean(), _with_rationale(metrics, inputs)


def rorpo(
    inputs: PairLogps, *, beta: float = 0.1, gamma: float = 1.0
) -> tuple[Tensor, LossMetrics]:
    """RORPO: ORPO plus γ times the token-mean NLL of the rationale.

    ``L = L_ORPO + γ·mean_b[−log π(r_b | x, y_c, y_r) / n_r,b]`` (per-example token mean, then
    the batch mean — as the released code's ``average_log_prob=True``). ``beta`` is ORPO's λ.
    Defaults β = 0.1 (TRL ``ORPOConfig``), γ = 1.0 (our choice).
    Paper: https://arxiv.org/abs/2407.14477. The released code also has a
    ``−log σ(γ·mean log π(r))`` variant; we follow the paper and its "simple" R-ORPO.
    """
    check_positive("beta", beta)
    check_nonnegative("gamma", gamma)
    _check_rationale(inputs, "rorpo")
    loss, metrics = orpo_terms(inputs, beta, "rorpo")
    term = -gamma * (inputs.rationale / inputs.rationale_tokens)
    return loss + term.mean(), _with_rationale(metrics, inputs)
