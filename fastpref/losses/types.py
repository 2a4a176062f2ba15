"""Inputs of the objectives: per-sequence log-probabilities or scores, never token tensors.

Every field is a tensor of shape ``[B]`` unless noted. Log-probabilities are summed over the
completion (or rationale) tokens; the token counts travel alongside so that a loss that needs a
length-averaged log-probability (IPO, SimPO, ORPO) can form it as ``logps / tokens``. Token
counts must be positive (the data layer drops examples whose completion is empty).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = [
    "ContrastiveEmbeddings",
    "KTOLogps",
    "ListLogps",
    "PairLogps",
    "RankPOScores",
    "RewardScores",
    "SFTLogps",
]


@dataclass
class PairLogps:
    """Data formats ``"pair"`` and ``"pair_rationale"``."""

    chosen: Tensor  # Σ policy log p over the chosen completion's tokens
    rejected: Tensor  # Σ policy log p over the rejected completion's tokens
    chosen_tokens: Tensor  # number of chosen completion tokens (float)
    rejected_tokens: Tensor  # number of rejected completion tokens (float)
    ref_chosen: Tensor | None = None  # Σ reference log p (None when reference-free)
    ref_rejected: Tensor | None = None
    rationale: Tensor | None = None  # Σ policy log p over the rationale's tokens (rdpo/rorpo)
    rationale_tokens: Tensor | None = None


@dataclass
class KTOLogps:
    """Data format ``"kto"``: unpaired completions with a desirable/undesirable label."""

    completion: Tensor  # Σ policy log p of the example's own completion
    completion_tokens: Tensor
    kl: Tensor  # Σ policy log p of a mismatched completion (prompt_i, completion_j)
    kl_tokens: Tensor
    label: Tensor  # bool, True = desirable
    ref_completion: Tensor | None = None
    ref_kl: Tensor | None = None


@dataclass
class ListLogps:
    """Data format ``"list"`` (LiPO): K responses per prompt with graded labels."""

    logps: Tensor  # [B,K] Σ policy log p of each response
    tokens: Tensor  # [B,K]
    scores: Tensor  # [B,K] graded labels ψ (higher is better)
    mask: Tensor  # [B,K] bool, True for real responses (False for padding)
    ref_logps: Tensor | None = None  # [B,K]


@dataclass
class SFTLogps:
    """Data format ``"sft"``."""

    logps: Tensor  # Σ log p of the completion's tokens
    tokens: Tensor


@dataclass
class RewardScores:
    """``"rm"`` on data format ``"pair"``: scalar rewards from a reward head."""

    chosen: Tensor  # reward of prompt + chosen
    rejected: Tensor  # reward of prompt + rejected
    margin: Tensor | None = None  # optional per-example margin m (Llama-2 style)


@dataclass
class RankPOScores:
    """RankPO stage 2: cosine similarities of a query with its preferred/other passage."""

    chosen: Tensor  # s_c = cos(q, preferred passage) under the model being trained
    rejected: Tensor  # s_r = cos(q, other passage)
    ref_chosen: Tensor | None = None  # same under the frozen stage-1 model (reference-based)
    ref_rejected: Tensor | None = None


@dataclass
class ContrastiveEmbeddings:
    """RankPO stage 1 (InfoNCE): the embeddings of one micro-batch in group layout.

    Query i's group is ``passages[i*G:(i+1)*G]``: its positive first, then its G−1 hard
    negatives. Keys identify texts (equal text, equal key; 0 is padding): a passage whose key is
    one of query i's positive keys is never a negative for query i.
    """

    queries: Tensor  # [B, D] query embeddings (L2-normalised when the model normalises)
    passages: Tensor  # [B*G, D] passage embeddings, group layout
    passage_keys: Tensor | None = None  # [B*G] int64 key of each passage's text
    positive_keys: Tensor | None = None  # [B, P] int64 keys of all of query i's positives
    gather: bool = False  # candidates from every rank (torch.distributed), gradients routed back
