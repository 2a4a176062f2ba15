"""Reference-based pairwise preference losses, as in TRL's ``DPOTrainer``.

All five share the implicit reward ``r(y) = β·(log π(y|x) − log π_ref(y|x))`` and the margin
``h = log-ratio(chosen) − log-ratio(rejected)`` with summed sequence log-probabilities (IPO
averages them over tokens, as TRL does). The loss is the mean over the B pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._checks import check_inputs, check_label_smoothing, check_positive
from fastpref.losses.metrics import LossMetrics, pair_metrics
from fastpref.losses.types import PairLogps

__all__ = ["cdpo", "dpo", "hinge", "ipo", "robust", "sigmoid_with_smoothing"]

_REF = ("chosen", "rejected", "chosen_tokens", "rejected_tokens", "ref_chosen", "ref_rejected")


def sigmoid_with_smoothing(logits: Tensor, label_smoothing: float) -> Tensor:
    """Per-example ``−(1−ε)·log σ(z) − ε·log σ(−z)`` (conservative / label-smoothed logistic)."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def _logratios(inputs: PairLogps, loss: str) -> tuple[Tensor, Tensor]:
    check_inputs(inputs, PairLogps, loss, _REF)
    return inputs.chosen - inputs.ref_chosen, inputs.rejected - inputs.ref_rejected


def _finish(
    losses: Tensor, beta: float, chosen_lr: Tensor, rejected_lr: Tensor, inputs: PairLogps
) -> tuple[Tensor, LossMetrics]:
    with torch.no_grad():
        metrics = pair_metrics(beta * chosen_lr, beta * rejected_lr, inputs.chosen, inputs.rejected)
    return losses.mean(), metrics


def dpo(inputs: PairLogps, *, beta: float = 0.1) -> tuple[Tensor, LossMetrics]:
    """DPO (sigmoid) loss.

    ``L = −log σ(β·h)``, ``h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))``.
    Default β = 0.1 (TRL ``DPOConfig``). With π = π_ref the loss is ln 2.
    Paper: https://arxiv.org/abs/2305.18290 (Eq. 7). TRL ``loss_type="sigmoid"``.
    """
    check_positive("beta", beta)
    chosen_lr, rejected_lr = _logratios(inputs, "dpo")
    losses = -F.logsigmoid(beta * (chosen_lr - rejected_lr))
    return _finish(losses, beta, chosen_lr, rejected_lr, inputs)


def cdpo(
    inputs: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1
) -> tuple[Tensor, LossMetrics]:
    """Conservative DPO: DPO with labels flipped with probability ε.

    ``L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)``, ε ∈ [0, 0.5). ε = 0 is DPO.
    Defaults β = 0.1 (TRL); ε = 0.1 is our choice (with TRL's default 0 it is plain DPO).
    Note: https://ericmitchell.ai/cdpo.pdf (Eq. 3). TRL ``loss_type="sigmoid"`` with
    ``label_smoothing=ε`` up to v0.x (TRL 1.x keeps ε for ``robust``/``exo_pair`` only).
    """
    check_positive("beta", beta)
    check_label_smoothing(label_smoothing)
    chosen_lr, rejected_lr = _logratios(inputs, "cdpo")
    losses = sigmoid_with_smoothing(beta * (chosen_lr - rejected_lr), label_smoothing)
    return _finish(losses, beta, chosen_lr, rejected_lr, inputs)


def robust(
    inputs: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1
) -> tuple[Tensor, LossMetrics]:
    """Robust DPO: an unbiased estimate of the DPO loss under label noise of rate ε.

    ``L = [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε)``, ε ∈ [0, 0.5). ε = 0 is DPO.
    Defaults β = 0.1 (TRL); ε = 0.1, the paper's typical value (TRL's default 0 is DPO). Being an
    unbiased correction, the loss goes negative for confidently ordered pairs (it equals
    ``softplus(−z) − ε·z/(1 − 2ε)``).
    Paper: https://arxiv.org/abs/2403.00409. TRL ``loss_type="robust"``.
    """
    check_positive("beta", beta)
    check_label_smoothing(label_smoothing)
    chosen_lr, rejected_lr = _logratios(inputs, "robust")
    z = beta * (chosen_lr - rejected_lr)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _finish(losses, beta, chosen_lr, rejected_lr, inputs)


def ipo(inputs: PairLogps, *, beta: float = 0.1) -> tuple[Tensor, LossMetrics]:
    """IPO: squared distance of the length-averaged log-ratio margin to 1/(2β).

    ``L = (h̄ − 1/(2β))²`` with ``h̄ = (log π(y_c) − log π_ref(y_c))/n_c −
    (log π(y_r) − log π_ref(y_r))/n_r`` (n = completion tokens). β plays the paper's τ.
    Default β = 0.1 (TRL). With π = π_ref the loss is 1/(4β²).
    Choice (as TRL): log-probs are averaged over tokens; the paper's Eq. 17 uses sums. The
    reported rewards use the same averaged log-ratios, times β.
    Paper: https://arxiv.org/abs/2310.12036. TRL ``loss_type="ipo"``.
    """
    check_positive("beta", beta)
    chosen_lr, rejected_lr = _logratios(inputs, "ipo")
    chosen_lr = chosen_lr / inputs.chosen_tokens
    rejected_lr = rejected_lr / inputs.rejected_tokens
    losses = (chosen_lr - rejected_lr - 1 / (2 * beta)) ** 2
    return _finish(losses, beta, chosen_lr, rejected_lr, inputs)


def hinge(inputs: PairLogps, *, beta: float = 0.1) -> tuple[Tensor, LossMetrics]:
    """SLiC / RSO hinge loss on the reference-normalised margin.

    ``L = max(0, 1 − β·h)``: zero once the margin exceeds 1/β. Default β = 0.1 (TRL).
    Papers: https://arxiv.org/abs/2305.10425 (SLiC), https://arxiv.org/abs/2309.06657 (RSO).
    TRL ``loss_type="hinge"``.
    """
    check_positive("beta", beta)
    chosen_lr, rejected_lr = _logratios(inputs, "hinge")
    losses = torch.relu(1 - beta * (chosen_lr - rejected_lr))
    return _finish(losses, beta, chosen_lr, rejected_lr, inputs)
