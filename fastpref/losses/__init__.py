"""Objectives: preference, ranking and reward losses as plain PyTorch.

Every trainer loss is ``fn(inputs, **hparams) -> (scalar loss, LossMetrics)`` with
keyword-only hyperparameters whose defaults are in the signature (each hyperparameter's doc and
range is in ``fastpref.losses.hparams``). Which ``--loss`` name trains which function on which
data is the families' registry, ``fastpref.families``.
"""

from __future__ import annotations

from fastpref.losses.contrastive import infonce_loss
from fastpref.losses.hparams import HPARAMS, Hparam
from fastpref.losses.kto import kto, kto_reference_point
from fastpref.losses.listwise import (
    lambdarank_loss,
    lipo,
    lipo_lambda_loss,
    listmle_loss,
    listnet_loss,
    ranknet_first_loss,
    ranknet_loss,
)
from fastpref.losses.metrics import LossMetrics
from fastpref.losses.pairwise import cdpo, dpo, hinge, ipo, robust
from fastpref.losses.rankpo import rankpo
from fastpref.losses.rationale import rdpo, rorpo
from fastpref.losses.reference_free import cpo, orpo, simpo
from fastpref.losses.sft_rm import rm, sft
from fastpref.losses.types import (
    ContrastiveEmbeddings,
    KTOLogps,
    ListLogps,
    PairLogps,
    RankPOScores,
    RewardScores,
    SFTLogps,
)

__all__ = [
    "HPARAMS",
    "ContrastiveEmbeddings",
    "Hparam",
    "KTOLogps",
    "ListLogps",
    "LossMetrics",
    "PairLogps",
    "RankPOScores",
    "RewardScores",
    "SFTLogps",
    "cdpo",
    "cpo",
    "dpo",
    "hinge",
    "infonce_loss",
    "ipo",
    "kto",
    "kto_reference_point",
    "lambdarank_loss",
    "lipo",
    "lipo_lambda_loss",
    "listmle_loss",
    "listnet_loss",
    "orpo",
    "rankpo",
    "ranknet_first_loss",
    "ranknet_loss",
    "rdpo",
    "rm",
    "robust",
    "rorpo",
    "sft",
    "simpo",
]
