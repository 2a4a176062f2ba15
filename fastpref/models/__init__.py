"""Models: loading (``loading``) and the adapters that turn a model's forward into what a loss
needs — hidden states + lm_head weight through the fused op (``causal_lm``), a scalar reward
(``reward``)."""

from fastpref.models.causal_lm import LMHead, PolicyLogps, backbone, lm_head
from fastpref.models.loading import (
    ModelError,
    attention_implementation,
    build_or_load_causal_lm,
    build_or_load_reward_model,
    check_model_path,
    load_tokenizer,
    model_identity,
)
from fastpref.models.reward import RewardScorer

__all__ = [
    "LMHead",
    "ModelError",
    "PolicyLogps",
    "RewardScorer",
    "attention_implementation",
    "backbone",
    "build_or_load_causal_lm",
    "build_or_load_reward_model",
    "check_model_path",
    "lm_head",
    "load_tokenizer",
    "model_identity",
]
