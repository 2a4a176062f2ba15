"""Listwise objectives: LiPO-λ for K responses per prompt, and the RankLLM ranking terms.

The ranking terms take ``scores[B,K]`` (higher = ranked higher), graded ``relevance[B,K]``
(higher = better) and an optional bool ``mask[B,K]`` of real items, and return one value per
list, ``[B]``; the caller reduces. Each is the fused ``fastpref.ops.listwise_loss`` of its kind
(the formulas, tie and mask rules, and the plain-PyTorch reference live there, once), behind the
argument checks a loss caller expects:

- a pair (i, j) counts when both are real and ``relevance_i > relevance_j`` (ties give none);
- pair loss ``log(1 + exp(−σ·(s_i − s_j)))`` = ``softplus(−σ·(s_i − s_j))``;
- ranks are 1-based; a list's value is the *sum* over its pairs (or items), 0 for a list with
  no real pair;
- padded items never enter a softmax, a rank or a pair; their scores may be anything finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpref.losses._checks import check_inputs, check_positive
from fastpref.losses.metrics import LossMetrics, pair_metrics, pairwise_correct
from fastpref.losses.types import ListLogps
from fastpref.ops import listwise_loss

__all__ = [
    "lambdarank_loss",
    "lipo",
    "lipo_lambda_loss",
    "listmle_loss",
    "listnet_loss",
    "ranknet_first_loss",
    "ranknet_loss",
]


def _prepare(scores: Tensor, relevance: Tensor, mask: Tensor | None, sigma: float) -> None:
    check_positive("sigma", sigma)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [B,K], got {tuple(scores.shape)}")
    if relevance.shape != scores.shape:
        raise ValueError(
            f"relevance has shape {tuple(relevance.shape)}, expected {tuple(scores.shape)} "
            "like scores"
        )
    if mask is not None and mask.shape != scores.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected {tuple(scores.shape)} like scores"
        )
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")


def _term(kind: str, scores, relevance, mask, sigma: float, weighting: str | None = None):
    _prepare(scores, relevance, mask, sigma)
    if mask is not None:  # padded items carry no relevance (the op also never reads them)
        relevance = torch.where(mask, relevance, torch.zeros_like(relevance))
    return listwise_loss(scores, relevance, mask, kind=kind, weighting=weighting, sigma=sigma)


def ranknet_loss(
    scores: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    *,
    weighting: str | None = None,
    sigma: float = 1.0,
) -> Tensor:
    """RankNet per list: ``Σ_{rel_i > rel_j} w_ij·log(1 + exp(−σ·(s_i − s_j)))``.

    ``weighting=None``: w = 1 (Burges et al. 2005, https://dl.acm.org/doi/10.1145/1102351.1102363).
    ``weighting="first"``: FIRST's w = 1/(r_i + r_j) with 1-based gold ranks r
    (https://arxiv.org/abs/2406.15657), which stresses the top of the ranking.
    Is ``listwise_loss(..., kind="ranknet", weighting=weighting, sigma=sigma)``.
    """
    if weighting not in (None, "first"):
        raise ValueError(f"weighting must be one of None, 'first'; got {weighting!r}")
    return _term("ranknet", scores, relevance, mask, sigma, weighting)


def ranknet_first_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """FIRST's weighted RankNet (the RankLLM ``ranknet`` ranking loss); see :func:`ranknet_loss`."""
    return ranknet_loss(scores, relevance, mask, weighting="first", sigma=sigma)


def lambdarank_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """LambdaRank per list: RankNet pairs weighted by the detached |ΔNDCG| of swapping them.

    ``Σ_{rel_i > rel_j} |ΔNDCG_ij|·log(1 + exp(−σ·(s_i − s_j)))``, ``|ΔNDCG_ij| =
    |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)| / IDCG``, G = 2^rel − 1, D(τ) = log2(1 + τ), τ the
    1-based rank by the current scores. Burges 2010, "From RankNet to LambdaRank to
    LambdaMART" (MSR-TR-2010-82); as a loss: https://dl.acm.org/doi/10.1145/3269206.3271784.
    Is ``listwise_loss(..., kind="lambda", sigma=sigma)``.
    """
    return _term("lambda", scores, relevance, mask, sigma)


def lipo_lambda_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """LiPO-λ per list: as :func:`lambdarank_loss` without the 1/IDCG normalisation.

    ``Σ_{ψ_i > ψ_j} Δ_ij·log(1 + exp(−σ·(s_i − s_j)))``, ``Δ_ij = |G_i − G_j|·|1/D(τ_i) −
    1/D(τ_j)|`` (LiPO, https://arxiv.org/abs/2402.01878).
    Is ``listwise_loss(..., kind="lipo", sigma=sigma)``.
    """
    return _term("lipo", scores, relevance, mask, sigma)


def listnet_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """ListNet (top-one) per list: cross-entropy of softmax(σ·scores) against softmax(relevance).

    ``−Σ_i softmax(rel)_i · log_softmax(σ·s)_i`` over the real items; σ is an inverse
    temperature (Cao et al. 2007, https://dl.acm.org/doi/10.1145/1273496.1273513).
    Is ``listwise_loss(..., kind="listnet", sigma=sigma)``.
    """
    return _term("listnet", scores, relevance, mask, sigma)


def listmle_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """ListMLE per list: negative Plackett–Luce log-likelihood of the gold order.

    With π sorting the real items by descending relevance (stable for ties) and z = σ·s:
    ``−Σ_i [z_π(i) − log Σ_{k ≥ i} exp(z_π(k))]`` (Xia et al. 2008,
    https://dl.acm.org/doi/10.1145/1390156.1390306). Is
    ``listwise_loss(..., kind="listmle", sigma=sigma)``.
    """
    return _term("listmle", scores, relevance, mask, sigma)


def lipo(inputs: ListLogps, *, beta: float = 0.1) -> tuple[Tensor, LossMetrics]:
    """LiPO-λ: listwise preference optimisation over K responses with graded labels ψ.

    ``L = mean_b Σ_{ψ_i > ψ_j} Δ_ij·log(1 + exp(−(s_i − s_j)))``, ``s_i = β·log(π(y_i)/π_ref(y_i))``
    and detached λ-weights ``Δ_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|``, G = 2^ψ − 1,
    D(τ) = log2(1 + τ), τ_i the rank of y_i by the current s (see :func:`lipo_lambda_loss`).
    Padded responses (mask False) are ignored. For K = 2 every pair has Δ = |G_1 − G_2|·
    (1 − 1/log2 3), so LiPO-λ is DPO scaled by that constant. Default β = 0.1 (as DPO; the
    paper uses 0.05). Summed log-probs, as DPO.
    Metrics: rewards/chosen and rewards/rejected are the mean rewards s of the best- and
    worst-labelled response of each list; accuracies is the fraction of ordered pairs whose
    rewards are ordered the same way (ties ½).
    Paper: https://arxiv.org/abs/2402.01878.
    """
    check_positive("beta", beta)
    check_inputs(
        inputs, ListLogps, "lipo", ("logps", "tokens", "scores", "mask", "ref_logps"), ndim=2
    )
    if inputs.mask.dtype != torch.bool:
        raise ValueError(f"lipo: ListLogps.mask must be a bool tensor, got {inputs.mask.dtype}")
    rewards = beta * (inputs.logps - inputs.ref_logps)
    loss = lipo_lambda_loss(rewards, inputs.scores, inputs.mask).mean()
    with torch.no_grad():
        mask = inputs.mask
        relevance = torch.where(mask, inputs.scores, torch.zeros_like(inputs.scores))
        far = torch.finfo(torch.float64).max
        rel = relevance.to(torch.float64)
        best = torch.where(mask, rel, -far).argmax(-1, keepdim=True)
        worst = torch.where(mask, rel, far).argmin(-1, keepdim=True)
        both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
        pairs = both & (relevance.unsqueeze(-1) > relevance.unsqueeze(-2))  # [B, K, K]
        ordered = pairwise_correct(rewards.unsqueeze(-1) - rewards.unsqueeze(-2)) * pairs
    metrics = pair_metrics(
        rewards.gather(-1, best),
        rewards.gather(-1, worst),
        inputs.logps.gather(-1, best),
        inputs.logps.gather(-1, worst),
        accuracies=ordered.sum() / pairs.sum(),
    )
    return loss, metrics
