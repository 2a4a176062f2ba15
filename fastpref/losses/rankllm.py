"""RankLLM's training objectives for LLM listwise rerankers (RankZephyr, FIRST).

A causal LM reads a prompt that numbers K passages with identifiers (``[A]`` … or ``[1]`` …)
and is trained on the gold permutation, written ``"[B] > [A] > …"``:

* ``generation`` (RankZephyr, https://arxiv.org/abs/2312.02724): the language-modelling NLL of
  the permutation's tokens, a token mean over the batch,
  ``L_gen = −Σ_b Σ_t log p(y_bt) / Σ_b T_b`` (what rank_llm's ``compute_generation_loss`` gives);
* ``ranking`` (FIRST, https://arxiv.org/abs/2406.15657): a learning-to-rank loss over the K
  identifier logits ``s_k = h·w_k`` at the first generated position (the hidden state after the
  target's ``"["``), ``L_rank = mean_b ℓ(s_b, rel_b)``, through ``fastpref.ops.listwise_loss``;
* ``combined`` (FirstMistral): ``L = L_gen + λ·L_rank`` from one forward of the shared prompt.

``ℓ`` is normalised per list as rank_llm does, so that λ means the same: ``ranknet`` and
``lambda`` average over the list's ordered pairs (``BCEWithLogits`` with mean reduction; FIRST's
``weighted`` 1/(r_i + r_j) weights are not renormalised), ``listnet`` is the list's
cross-entropy, ``listmle`` the Plackett–Luce NLL divided by the list's length (rank_llm has no
ListMLE). Lists without a pair (all relevance tied) are left out of the mean; a batch without
one gives 0. The relevance is a constant of the data (e.g. ``K − r`` for gold rank r), never the
model's own scores as rank_llm's ``true_scores`` are, so no gradient flows through the target.

λ (``ranking_weight``) defaults to rank_llm's choice: 10 for weighted RankNet (the FirstMistral
script), 0.1 for ListNet, 1 otherwise. ``ranking`` alone is ``L_rank`` (λ does not apply).
rank_llm's ``lambda`` is LambdaLoss (ndcgLoss2); fastpref's ``lambda`` is LambdaRank (|ΔNDCG|
weights, ``fastpref.losses.lambdarank_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastpref.losses._checks import check_choice, check_nonnegative
from fastpref.losses.metrics import LossMetrics, pairwise_correct
from fastpref.ops import listwise_loss

__all__ = ["OBJECTIVES", "RANKING_LOSSES", "RankLLMOutputs", "default_ranking_weight", "rankllm"]

OBJECTIVES = ("generation", "ranking", "combined")
RANKING_LOSSES = ("ranknet", "lambda", "listnet", "listmle")
_PAIRWISE = ("ranknet", "lambda")


@dataclass
class RankLLMOutputs:
    """What one forward of a batch of ranking prompts gives the ``rankllm`` objective."""

    relevance: Tensor  # [B, K] graded relevance of each passage (higher = better), a constant
    mask: Tensor  # [B, K] bool, True for the prompt's real passages (lists are ragged)
    logps: Tensor | None = None  # [B] Σ log p of the target permutation's tokens (generation)
    tokens: Tensor | None = None  # [B] number of target tokens (float)
    scores: Tensor | None = None  # [B, K] identifier logits at the first target position


def default_ranking_weight(ranking_loss: str, weighted: bool) -> float:
    """rank_llm's λ: 10 for weighted RankNet (FirstMistral), 0.1 for ListNet, else 1."""
    if ranking_loss == "ranknet" and weighted:
        return 10.0
    return 0.1 if ranking_loss == "listnet" else 1.0


def _pair_counts(relevance: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` ordered pairs (i, j) of real items with rel_i > rel_j, in O(B·K²) booleans — the
    small K (≤ 100 identifiers) keeps this negligible beside the forward."""
    both = mask[:, :, None] & mask[:, None, :]
    return (both & (relevance[:, :, None] > relevance[:, None, :])).sum((1, 2))


def ranking_term(
    scores: Tensor, relevance: Tensor, mask: Tensor, *, ranking_loss: str, weighted: bool
) -> tuple[Tensor, Tensor]:
    """``(L_rank, lists that count)``: the normalised per-list loss averaged over the lists that
    have a pair (see the module docstring)."""
    weighting = "first" if weighted else None
    per_list = listwise_loss(
        scores.float(), relevance.float(), mask, kind=ranking_loss, weighting=weighting
    )  # [B] sums
    pairs = _pair_counts(relevance, mask).to(per_list.dtype)
    if ranking_loss in _PAIRWISE:
        per_list = per_list / pairs.clamp(min=1)
    elif ranking_loss == "listmle":
        per_list = per_list / mask.sum(-1).clamp(min=1).to(per_list.dtype)
    counts = pairs > 0
    n = counts.sum()
    return torch.where(counts, per_list, 0.0).sum() / n.clamp(min=1), n


def rankllm(
    inputs: RankLLMOutputs,
    *,
    objective: str = "combined",
    ranking_loss: str = "ranknet",
    weighted: bool = False,
    ranking_weight: float | None = None,
) -> tuple[Tensor, LossMetrics]:
    """RankLLM's objective: ``L_gen``, ``L_rank`` or ``L_gen + λ·L_rank`` (module docstring).

    Worked example (ranking, ranknet, unweighted): K = 2, s = [0, 0], rel = [1, 0] gives one
    pair and L = softplus(0) = ln 2 ≈ 0.6931. Metrics: ``nll_loss`` (L_gen), ``rank_loss``
    (L_rank, before λ) and ``rewards/accuracies`` (pairs the identifier logits order as the gold
    permutation does, ties ½).
    """
    check_choice("objective", objective, OBJECTIVES)
    check_choice("ranking_loss", ranking_loss, RANKING_LOSSES)
    if not isinstance(weighted, bool):
        raise ValueError(f"weighted must be a bool, got {weighted!r}")
    if weighted and ranking_loss not in _PAIRWISE:
        raise ValueError(
            f"weighted (FIRST's 1/(r_i + r_j) pair weights) applies to ranknet and lambda, "
            f"not ranking_loss={ranking_loss!r}"
        )
    if ranking_weight is None:
        ranking_weight = default_ranking_weight(ranking_loss, weighted)
    check_nonnegative("ranking_weight", ranking_weight)
    wants_gen, wants_rank = objective != "ranking", objective != "generation"
    if wants_gen and (inputs.logps is None or inputs.tokens is None):
        raise ValueError(f"rankllm: objective {objective!r} needs RankLLMOutputs.logps and tokens")
    if wants_rank and inputs.scores is None:
        raise ValueError(f"rankllm: objective {objective!r} needs RankLLMOutputs.scores")
    if inputs.mask.dtype != torch.bool or inputs.relevance.shape != inputs.mask.shape:
        raise ValueError(
            "rankllm: RankLLMOutputs.mask must be a bool tensor of the shape of relevance "
            f"{tuple(inputs.relevance.shape)}, got {inputs.mask.dtype} {tuple(inputs.mask.shape)}"
        )
    gen = rank = accuracy = None
    if wants_gen:
        gen = -inputs.logps.sum() / inputs.tokens.sum().clamp(min=1)
    if wants_rank:
        rank, _ = ranking_term(
            inputs.scores,
            inputs.relevance,
            inputs.mask,
            ranking_loss=ranking_loss,
            weighted=weighted,
        )
        with torch.no_grad():
            s, r, m = inputs.scores.float(), inputs.relevance, inputs.mask
            pairs = m[:, :, None] & m[:, None, :] & (r[:, :, None] > r[:, None, :])
            correct = pairwise_correct(s[:, :, None] - s[:, None, :])
            accuracy = (correct * pairs).sum() / pairs.sum().clamp(min=1)
    if objective == "generation":
        loss = gen
    elif objective == "ranking":
        loss = rank
    else:
        loss = gen + ranking_weight * rank
    metrics = LossMetrics(rewards_accuracies=accuracy, nll_loss=gen, rank_loss=rank)
    return loss, metrics
