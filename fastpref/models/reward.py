"""A scalar reward head for ``--loss rm`` (Bradley–Terry reward modelling).

The reward of a sequence is the head's value at its last real (non-padding) token, as in
InstructGPT / DeepSpeed-Chat. Decoder models (``...ForSequenceClassification`` with a ``score``
head) are pooled here from the backbone's hidden states, so the result does not depend on the
padding side or on ``pad_token_id``; other models pool themselves (e.g. an encoder's CLS token).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastpref.constants import IGNORE_INDEX
from fastpref.models.causal_lm import backbone

__all__ = ["RewardScorer"]


class RewardScorer(nn.Module):
    """``forward(input_ids, attention_mask, labels=None) -> (reward [N], tokens [N])``.

    reward_n = head(h_n[last real token]); equals ``model(...).logits[:, 0]`` of a Hugging Face
    sequence-classification model with right padding. ``tokens`` counts the labelled
    (completion) tokens, or the attended tokens when no labels are given.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        # completion tokens when labels mark them (as for the LM losses), else attended tokens
        tokens = attention_mask.sum(-1) if labels is None else (labels != IGNORE_INDEX).sum(-1)
        head = getattr(self.model, "score", None)
        if head is None:  # encoders and models that pool for themselves
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return out.logits[:, 0].float(), tokens.float()
        hidden = backbone(self.model)(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # [N, T, D]
        # last attended position, robust to either padding side
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [N, D]
        return head(pooled)[:, 0].float(), tokens.float()
