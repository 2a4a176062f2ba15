"""How a model yields what a loss needs: hidden states + lm_head weight, or a scalar reward."""

from fastpref.models.causal_lm import (
    LMHead,
    ModelError,
    PolicyLogps,
    attention_implementation,
    build_or_load_causal_lm,
    check_model_path,
    lm_head,
    load_tokenizer,
    model_identity,
)
from fastpref.models.reward import RewardScorer, build_or_load_reward_model

__all__ = [
    "LMHead",
    "ModelError",
    "PolicyLogps",
    "RewardScorer",
    "attention_implementation",
    "build_or_load_causal_lm",
    "build_or_load_reward_model",
    "check_model_path",
    "lm_head",
    "load_tokenizer",
    "model_identity",
]
