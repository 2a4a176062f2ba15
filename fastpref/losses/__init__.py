"""Objectives: preference, ranking and reward losses as plain PyTorch, and their registry.

Every trainer loss is ``fn(inputs, **hparams) -> (scalar loss, LossMetrics)`` with
keyword-only hyperparameters whose defaults are in the signature. ``LOSSES`` maps each
``--loss`` name to a :class:`LossSpec`; :func:`get_loss` looks one up.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

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
    KTOLogps,
    ListLogps,
    PairLogps,
    RankPOScores,
    RewardScores,
    SFTLogps,
)

__all__ = [
    "LOSSES",
    "KTOLogps",
    "ListLogps",
    "LossMetrics",
    "LossSpec",
    "PairLogps",
    "RankPOScores",
    "RewardScores",
    "SFTLogps",
    "cdpo",
    "cpo",
    "dpo",
    "get_loss",
    "hinge",
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


@dataclass(frozen=True)
class LossSpec:
    """What the trainer needs to know about a loss besides the function itself."""

    name: str  # the --loss value
    fn: Callable  # fn(inputs, **hparams) -> (loss, LossMetrics)
    inputs: type  # the input dataclass fn takes
    data_format: str  # "pair" | "pair_rationale" | "kto" | "list" | "sft"
    needs_reference: bool  # whether fn reads reference log-probs

    def hparams(self) -> dict[str, object]:
        """Keyword-only hyperparameter names -> defaults, read from ``fn``'s signature."""
        return {
            p.name: p.default
            for p in inspect.signature(self.fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def __call__(self, inputs: object, **hparams: object) -> tuple:
        return self.fn(inputs, **hparams)


_SPECS = (
    LossSpec("sft", sft, SFTLogps, "sft", False),
    LossSpec("rm", rm, RewardScores, "pair", False),
    LossSpec("dpo", dpo, PairLogps, "pair", True),
    LossSpec("cdpo", cdpo, PairLogps, "pair", True),
    LossSpec("robust", robust, PairLogps, "pair", True),
    LossSpec("ipo", ipo, PairLogps, "pair", True),
    LossSpec("hinge", hinge, PairLogps, "pair", True),
    LossSpec("simpo", simpo, PairLogps, "pair", False),
    LossSpec("cpo", cpo, PairLogps, "pair", False),
    LossSpec("orpo", orpo, PairLogps, "pair", False),
    LossSpec("kto", kto, KTOLogps, "kto", True),
    LossSpec("rdpo", rdpo, PairLogps, "pair_rationale", True),
    LossSpec("rorpo", rorpo, PairLogps, "pair_rationale", False),
    LossSpec("lipo", lipo, ListLogps, "list", True),
)
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _SPECS}


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` registered as ``name``; ValueError listing the choices if none."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}") from None
