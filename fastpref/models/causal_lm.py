"""A causal LM as the fused op sees it: backbone hidden states plus the lm_head (or tied) weight.

The trainer never calls the model's own ``forward`` (which would build the ``[B, T, V]`` logits):
it runs the backbone, then hands the last hidden states, the output-embedding weight and bias, and
the labels to ``fastpref.sequence_logprobs``, which drops every position whose label is
``ignore_index`` before its GEMM. So only completion (and rationale) tokens ever meet the
vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastpref.constants import IGNORE_INDEX
from fastpref.models.packing import pack_rows, packing_supported
from fastpref.ops import sequence_logprobs
from fastpref.ops.linear import ROW_PAD, onednn_linear_enabled
from fastpref.ops.linear_logprobs import check_labels, run_logprobs

__all__ = ["LMHead", "PolicyLogps", "backbone", "lm_head"]


@dataclass(frozen=True)
class LMHead:
    """What the fused op needs from a model's output layer."""

    weight: Tensor  # [V, D] lm_head weight (the input embedding when tied)
    bias: Tensor | None  # [V] or None
    softcap: float | None  # Gemma-2 `final_logit_softcapping`: z = c·tanh(z/c)


def lm_head(model: nn.Module) -> LMHead:
    """The output layer of a Hugging Face causal LM (tied weights resolve to the embedding)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return LMHead(head.weight, getattr(head, "bias", None), float(softcap) if softcap else None)


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that returns the last hidden states (after the final norm)."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None:
            return decoder
    return getattr(model, model.base_model_prefix)


class PolicyLogps(nn.Module):
    """``forward(input_ids, attention_mask, labels) -> (Σ log p [N], completion tokens [N])``.

    Equals ``model(input_ids).logits.log_softmax(-1).gather(-1, labels)`` summed over the
    labelled positions (labels already aligned with the hidden states, ``-100`` elsewhere),
    without the ``[N, T, V]`` logits. The wrapper is what DeepSpeed wraps, so under ZeRO-3 the
    lm_head weight is registered as an external parameter of this module: DeepSpeed gathers it
    for the fused op in forward and backward, and its gradient reaches the partitioned shard.

    ``packing=True`` (the default where the model supports it, see ``packing_supported``) runs
    the backbone on the prefix-shared packed batch of ``fastpref.models.packing``: no padding,
    one copy of a prompt its completions share; the result is the same up to float rounding.
    """

    def __init__(self, model: nn.Module, *, zero_stage: int = 0, packing: bool = True) -> None:
        super().__init__()
        self.model = model
        self.packing = packing and packing_supported(model, backbone(model))
        # rows x L a multiple of the padding the oneDNN linears would otherwise copy to
        self.row_multiple = ROW_PAD if onednn_linear_enabled() else 1
        if zero_stage == 3:
            import deepspeed

            head = lm_head(model)
            deepspeed.zero.register_external_parameter(self, head.weight)
            if head.bias is not None:
                deepspeed.zero.register_external_parameter(self, head.bias)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        tokens = (labels != IGNORE_INDEX).sum(-1).float()
        head = lm_head(self.model)
        if self.packing:  # name a bad label by its (row, position) before packing moves it
            check_labels(labels, head.weight.shape[0], IGNORE_INDEX, "PolicyLogps")
        packed = (
            pack_rows(input_ids, attention_mask, labels, row_multiple=self.row_multiple)
            if self.packing
            else None
        )
        if packed is None:
            hidden = backbone(self.model)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # [N, T, D]
            logps = sequence_logprobs(hidden, head.weight, labels, head.bias, softcap=head.softcap)
            return logps, tokens
        mask = packed.mask
        if self.model.config._attn_implementation == "eager":  # eager adds the mask to scores
            dtype = head.weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        hidden = backbone(self.model)(
            input_ids=packed.input_ids,
            attention_mask=mask,
            position_ids=packed.position_ids,
            use_cache=False,
        ).last_hidden_state  # [rows, L, D]
        scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.source)
        logp = run_logprobs(  # the labels were checked above, before packing moved them
            "PolicyLogps", scored, head.weight, packed.targets, head.bias,
            backend=None, softcap=head.softcap, targets_checked=True,
        )[0]  # fmt: skip
        logps = logp.new_zeros(packed.num_sequences).index_add(0, packed.sequence, logp)
        return logps, tokens
