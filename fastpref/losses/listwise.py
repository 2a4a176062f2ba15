"""Listwise objectives: LiPO-λ for K responses per prompt, and the RankLLM ranking terms.

The ranking terms take ``scores[B,K]`` (higher = ranked higher), graded ``relevance[B,K]``
(higher = better) and an optional bool ``mask[B,K]`` of real items, and return one value per
list, ``[B]``; the caller reduces. They are plain PyTorch and materialise the ``B×K×K`` pair
tensors: they are the reference for ``fastpref.ops.listwise_loss``, which does not.
Conventions shared by all of them:

- a pair (i, j) counts when both are real and ``relevance_i > relevance_j`` (ties give none);
- pair loss ``log(1 + exp(−σ·(s_i − s_j)))`` = ``softplus(−σ·(s_i − s_j))``;
- ranks are 1-based; a list's value is the *sum* over its pairs (or items), 0 for a list with
  no real pair;
- padded items never enter a softmax, a rank or a pair; their scores may be anything finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._checks import check_inputs, check_positive
from fastpref.losses.metrics import LossMetrics, pair_metrics
from fastpref.losses.types import ListLogps

__all__ = [
    "lambdarank_loss",
    "lipo",
    "lipo_lambda_loss",
    "listmle_loss",
    "listnet_loss",
    "ranknet_first_loss",
    "ranknet_loss",
]


def _prepare(scores: Tensor, relevance: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [B,K], got {tuple(scores.shape)}")
    if relevance.shape != scores.shape:
        raise ValueError(
            f"relevance has shape {tuple(relevance.shape)}, expected {tuple(scores.shape)} "
            "like scores"
        )
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    elif mask.shape != scores.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected {tuple(scores.shape)} like scores"
        )
    elif mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    relevance = torch.where(mask, relevance, torch.zeros_like(relevance))
    return relevance, mask


def _pairs(relevance: Tensor, mask: Tensor) -> Tensor:
    """[B,K,K] bool: i more relevant than j, both real."""
    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return both & (relevance.unsqueeze(-1) > relevance.unsqueeze(-2))


def _pair_logistic(scores: Tensor, sigma: float) -> Tensor:
    """[B,K,K] ``softplus(−σ·(s_i − s_j))``."""
    return F.softplus(-sigma * (scores.unsqueeze(-1) - scores.unsqueeze(-2)))


def _ranks_by_score(scores: Tensor, mask: Tensor) -> Tensor:
    """1-based rank of each item by descending score among the real items (ties: lower index
    first); padded items rank after every real one."""
    keyed = torch.where(mask, scores.detach(), torch.full_like(scores, float("-inf")))
    order = torch.argsort(keyed, dim=-1, descending=True, stable=True)
    positions = torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _gold_ranks(relevance: Tensor, mask: Tensor) -> Tensor:
    """1-based gold rank ``1 + #{j real: rel_j > rel_i}`` (tied items share a rank)."""
    return 1 + _pairs(relevance, mask).sum(dim=-2)


def _sum_pairs(values: Tensor, pairs: Tensor) -> Tensor:
    return torch.where(pairs, values, torch.zeros_like(values)).sum(dim=(-2, -1))


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
    Equals ``listwise_loss(..., kind="ranknet", weighting=weighting, sigma=sigma)``.
    """
    check_positive("sigma", sigma)
    if weighting not in (None, "first"):
        raise ValueError(f"weighting must be one of None, 'first'; got {weighting!r}")
    relevance, mask = _prepare(scores, relevance, mask)
    pairs = _pairs(relevance, mask)
    losses = _pair_logistic(scores, sigma)
    if weighting == "first":
        ranks = _gold_ranks(relevance, mask).to(scores.dtype)
        losses = losses / (ranks.unsqueeze(-1) + ranks.unsqueeze(-2))
    return _sum_pairs(losses, pairs)


def ranknet_first_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """FIRST's weighted RankNet (the RankLLM ``ranknet`` ranking loss); see :func:`ranknet_loss`."""
    return ranknet_loss(scores, relevance, mask, weighting="first", sigma=sigma)


def _lambda_weights(scores: Tensor, relevance: Tensor, mask: Tensor, normalize: bool) -> Tensor:
    """[B,K,K] detached ``|G_i − G_j|·|1/D_i − 1/D_j|`` with gain G = 2^rel − 1 and
    discount D = log2(1 + rank by current score); divided by the ideal DCG if ``normalize``."""
    with torch.no_grad():
        rel = relevance.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
        gain = torch.where(mask, torch.exp2(rel) - 1, torch.zeros_like(rel))
        rank = _ranks_by_score(scores, mask).to(rel.dtype)
        inv_disc = torch.where(mask, 1 / torch.log2(1 + rank), torch.zeros_like(rank))
        w = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs()
        w = w * (inv_disc.unsqueeze(-1) - inv_disc.unsqueeze(-2)).abs()
        if normalize:
            ideal = gain.sort(dim=-1, descending=True).values
            positions = torch.arange(1, gain.shape[-1] + 1, device=gain.device, dtype=rel.dtype)
            idcg = (ideal / torch.log2(1 + positions)).sum(-1)
            w = torch.where(idcg[:, None, None] > 0, w / idcg.clamp_min(1e-30)[:, None, None], 0)
        return w.to(scores.dtype)


def lambdarank_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """LambdaRank per list: RankNet pairs weighted by the detached |ΔNDCG| of swapping them.

    ``Σ_{rel_i > rel_j} |ΔNDCG_ij|·log(1 + exp(−σ·(s_i − s_j)))``, ``|ΔNDCG_ij| =
    |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)| / IDCG``, G = 2^rel − 1, D(τ) = log2(1 + τ), τ the
    1-based rank by the current scores. Burges 2010, "From RankNet to LambdaRank to
    LambdaMART" (MSR-TR-2010-82); as a loss: https://dl.acm.org/doi/10.1145/3269206.3271784.
    Equals ``listwise_loss(..., kind="lambda", sigma=sigma)``.
    """
    check_positive("sigma", sigma)
    relevance, mask = _prepare(scores, relevance, mask)
    weights = _lambda_weights(scores, relevance, mask, normalize=True)
    return _sum_pairs(weights * _pair_logistic(scores, sigma), _pairs(relevance, mask))


def lipo_lambda_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """LiPO-λ per list: as :func:`lambdarank_loss` without the 1/IDCG normalisation.

    ``Σ_{ψ_i > ψ_j} Δ_ij·log(1 + exp(−σ·(s_i − s_j)))``, ``Δ_ij = |G_i − G_j|·|1/D(τ_i) −
    1/D(τ_j)|`` (LiPO, https://arxiv.org/abs/2402.01878).
    Equals ``listwise_loss(..., kind="lipo", sigma=sigma)``.
    """
    check_positive("sigma", sigma)
    relevance, mask = _prepare(scores, relevance, mask)
    weights = _lambda_weights(scores, relevance, mask, normalize=False)
    return _sum_pairs(weights * _pair_logistic(scores, sigma), _pairs(relevance, mask))


def listnet_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """ListNet (top-one) per list: cross-entropy of softmax(σ·scores) against softmax(relevance).

    ``−Σ_i softmax(rel)_i · log_softmax(σ·s)_i`` over the real items; σ is an inverse
    temperature (Cao et al. 2007, https://dl.acm.org/doi/10.1145/1273496.1273513).
    Equals ``listwise_loss(..., kind="listnet", sigma=sigma)``.
    """
    check_positive("sigma", sigma)
    relevance, mask = _prepare(scores, relevance, mask)
    # a finite fill (not −inf) keeps an all-padded list at 0 and every gradient finite
    low = torch.finfo(scores.dtype).min
    target = torch.softmax(relevance.to(scores.dtype).masked_fill(~mask, low), dim=-1)
    log_p = torch.log_softmax((sigma * scores).masked_fill(~mask, low), dim=-1)
    return -torch.where(mask, target * log_p, torch.zeros_like(log_p)).sum(-1)


def listmle_loss(
    scores: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """ListMLE per list: negative Plackett–Luce log-likelihood of the gold order.

    With π sorting the real items by descending relevance (stable for ties) and z = σ·s:
    ``−Σ_i [z_π(i) − log Σ_{k ≥ i} exp(z_π(k))]`` via a reversed logcumsumexp (Xia et al. 2008,
    https://dl.acm.org/doi/10.1145/1390156.1390306). Equals
    ``listwise_loss(..., kind="listmle", sigma=sigma)``.
    """
    check_positive("sigma", sigma)
    relevance, mask = _prepare(scores, relevance, mask)
    low = torch.finfo(scores.dtype).min
    key = relevance.to(torch.float64).masked_fill(~mask, -torch.inf)
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    z = (sigma * scores).masked_fill(~mask, low).gather(-1, order)
    real = mask.gather(-1, order)
    tail_lse = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)
    return -torch.where(real, z - tail_lse, torch.zeros_like(z)).sum(-1)


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
    rewards are ordered the same way.
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
        relevance, mask = _prepare(rewards, inputs.scores, inputs.mask)
        far = torch.finfo(torch.float64).max
        rel = relevance.to(torch.float64)
        best = torch.where(mask, rel, -far).argmax(-1, keepdim=True)
        worst = torch.where(mask, rel, far).argmin(-1, keepdim=True)
        pairs = _pairs(relevance, mask)
        ordered = (rewards.unsqueeze(-1) > rewards.unsqueeze(-2)) & pairs
    metrics = pair_metrics(
        rewards.gather(-1, best),
        rewards.gather(-1, worst),
        inputs.logps.gather(-1, best),
        inputs.logps.gather(-1, worst),
        accuracies=ordered.sum() / pairs.sum(),
    )
    return loss, metrics
