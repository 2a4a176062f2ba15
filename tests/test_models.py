"""Model adapters: the fused path equals the model's own logits; reward pooling; identities.

Shapes are tiny (D=32, 2 layers, V=97) so each test takes well under a second: the adapters are
glue, what matters is that they feed the op the same tensors the model's own head would use.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from fastpref.models import PolicyLogps, RewardScorer, check_model_path, lm_head, model_identity
from fastpref.models.causal_lm import IGNORE_INDEX

V = 97


def _llama(tie: bool, cls=LlamaForCausalLM, **kw):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        **kw,
    )
    return cls(config).eval()


def _batch(N=3, T=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 8:] = 0  # right padding on one row
    labels = torch.full((N, T), IGNORE_INDEX)
    labels[:, 4:-1] = ids[:, 5:]  # completion = positions 5.., labels aligned with hidden states
    labels[1, 7:] = IGNORE_INDEX
    return ids, mask, labels


def _expected(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # applies any softcap
    keep = labels != IGNORE_INDEX
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1), keep.sum(-1).float()


@pytest.mark.parametrize("tie", [True, False])
def test_policy_logps_equal_model_logits(tie):
    model = _llama(tie)
    ids, mask, labels = _batch()
    got, tokens = PolicyLogps(model)(ids, mask, labels)
    want, want_tokens = _expected(model, ids, mask, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tokens, want_tokens)
    assert lm_head(model).weight is model.get_output_embeddings().weight


def test_gemma2_final_logit_softcapping_is_honoured():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=0.5,
    )  # small cap: it changes every logit
    model = Gemma2ForCausalLM(config).eval()
    assert lm_head(model).softcap == 0.5
    ids, mask, labels = _batch()
    got, _ = PolicyLogps(model)(ids, mask, labels)
    want, _ = _expected(model, ids, mask, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_policy_logps_gradient_reaches_lm_head_and_backbone():
    model = _llama(tie=False)
    ids, mask, labels = _batch()
    PolicyLogps(model)(ids, mask, labels)[0].sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_reward_is_head_value_at_last_real_token():
    model = _llama(tie=False, cls=LlamaForSequenceClassification, num_labels=1, pad_token_id=0)
    ids, mask, _ = _batch()
    ids = ids.clamp(min=1) * mask  # pad id 0 exactly where the mask is 0
    reward, tokens = RewardScorer(model)(ids, mask)
    want = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(reward, want, rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == [11, 8, 11]


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        check_model_path(str(tmp_path / "does-not-exist"))
    check_model_path("org/name")  # a hub name is left to the Hub


def test_model_identity_tracks_built_weights():
    a, b = _llama(tie=False), _llama(tie=False)
    assert model_identity(None, a) == model_identity(None, b)
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1
    assert model_identity(None, a) != model_identity(None, b)
