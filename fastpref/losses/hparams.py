"""Every loss hyperparameter, declared once: its one-line doc and its valid range.

A loss takes a hyperparameter as a keyword-only argument whose default is in the signature (so
the default can differ per loss: SimPO's β is 2, DPO's 0.1); the trainer derives the flag
``--<name>`` and the config key from the signature and the entry here, and checks a value with
``check`` while parsing the options, before anything is loaded. The losses keep their own checks
for Python callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastpref.losses._checks import (
    check_choice,
    check_finite,
    check_label_smoothing,
    check_nonnegative,
    check_positive,
)

__all__ = ["HPARAMS", "Hparam"]


@dataclass(frozen=True)
class Hparam:
    type: type
    help: str
    check: Callable[[str, object], None]  # check(name, value) raises ValueError
    choices: tuple | None = None


def _label_smoothing(name: str, value: object) -> None:
    check_label_smoothing(value)


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[str, object], None]:
    return lambda name, value: check_choice(name, value, choices)


HPARAMS: dict[str, Hparam] = {
    "beta": Hparam(float, "β: strength of the preference term (all but sft/rm)", check_positive),
    "label_smoothing": Hparam(
        float,
        "ε ∈ [0, 0.5): assumed label-flip rate (cdpo/robust/simpo/cpo/rankpo)",
        _label_smoothing,
    ),
    "gamma": Hparam(
        float, "γ: rationale weight (rdpo/rorpo), SimPO's margin or RankPO's γ/β", check_finite
    ),
    "alpha": Hparam(float, "α ≥ 0: weight of the NLL term of cpo/simpo", check_nonnegative),
    "rationale_term": Hparam(
        str,
        "rdpo: rationale term, nll (paper) or logsigmoid (authors' code)",
        _choice("nll", "logsigmoid"),
        ("nll", "logsigmoid"),
    ),
    "center_rewards_coefficient": Hparam(
        float, "rm: weight ≥ 0 of the reward-centring term", check_nonnegative
    ),
    "desirable_weight": Hparam(float, "kto: weight > 0 of desirable examples", check_positive),
    "undesirable_weight": Hparam(float, "kto: weight > 0 of undesirable examples", check_positive),
    "objective": Hparam(
        str,
        "rankllm: generation (LM) | ranking (FIRST) | combined (LM + λ·ranking); unset: combined",
        _choice("generation", "ranking", "combined"),
        ("generation", "ranking", "combined"),
    ),
    "ranking_loss": Hparam(
        str,
        "rankllm: learning-to-rank loss over the identifier logits; unset: ranknet",
        _choice("ranknet", "lambda", "listnet", "listmle"),
        ("ranknet", "lambda", "listnet", "listmle"),
    ),
    "weighted": Hparam(
        bool, "rankllm: FIRST's 1/(r_i + r_j) pair weights (ranknet, lambda); unset: off", _bool
    ),
    "ranking_weight": Hparam(
        float,
        "rankllm: λ ≥ 0 of combined; unset: 10 weighted ranknet, 0.1 listnet, else 1",
        check_nonnegative,
    ),
    "temperature": Hparam(
        float,
        "infonce: τ > 0 of the softmax over similarities; unset: 0.05 (sentence-transformers' "
        "scale 20; RankPO's code uses 0.02)",
        check_positive,
    ),
    "symmetric": Hparam(
        bool, "infonce: add CLIP's passage→query term (positives against all queries)", _bool
    ),
    "tau": Hparam(
        float, "rankpo: τ > 0 dividing the similarity margin; unset: 0.02", check_positive
    ),
    "loss_type": Hparam(
        str,
        "rankpo: sigmoid (DPO-style) or hinge; unset: sigmoid",
        _choice("sigmoid", "hinge"),
        ("sigmoid", "hinge"),
    ),
    "sft_weight": Hparam(
        float,
        "rankpo: weight ≥ 0 of the 2-way cross-entropy over the pair's scores",
        check_nonnegative,
    ),
    "reference_free": Hparam(
        bool, "rankpo: no reference term (Δ = s_c − s_r); unset: reference-based", _bool
    ),
}
