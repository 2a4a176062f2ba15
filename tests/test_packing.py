"""Prefix-shared packing: the packed forward scores exactly what the padded batch scores.

Tiny Llama (D=32, 2 layers, V=97); every test compares ``PolicyLogps`` with packing against the
same module without it (and against the model's own logits), values and gradients.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastpref.models import PolicyLogps
from fastpref.models.causal_lm import IGNORE_INDEX
from fastpref.models.packing import _aligned_length, pack_rows, packing_supported

V = 97


def _llama(attn: str = "sdpa", **kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn, **kw,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _rows(spec: list[tuple[list[int], list[int]]], pad: int = 0):
    """Right-padded batch from (prompt, completion) token lists; labels score the completion."""
    T = max(len(p) + len(c) for p, c in spec)
    ids = torch.full((len(spec), T), pad)
    mask = torch.zeros(len(spec), T, dtype=torch.long)
    labels = torch.full((len(spec), T), IGNORE_INDEX)
    for r, (p, c) in enumerate(spec):
        seq = torch.tensor(p + c)
        ids[r, : len(seq)], mask[r, : len(seq)] = seq, 1
        if c:
            labels[r, len(p) - 1 : len(seq) - 1] = torch.tensor(c)
    return ids, mask, labels


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _pairs():
    """Role-major like ``collate``: chosen rows of 3 examples, then their rejected rows."""
    prompts = [_tokens(1, 5), _tokens(2, 3), _tokens(3, 7)]
    chosen = [_tokens(10, 6), _tokens(11, 2), _tokens(12, 4)]
    rejected = [_tokens(20, 3), _tokens(21, 8), _tokens(22, 5)]
    return _rows([*zip(prompts, chosen, strict=True), *zip(prompts, rejected, strict=True)])


def _expected(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    keep = labels != IGNORE_INDEX
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


def _compare(model, ids, mask, labels, atol=2e-5):
    packed_scorer, padded_scorer = PolicyLogps(model), PolicyLogps(model, packing=False)
    assert packed_scorer.packing and not padded_scorer.packing
    values = []
    for scorer in (packed_scorer, padded_scorer):
        model.zero_grad()
        logps, tokens = scorer(ids, mask, labels)
        (logps * torch.linspace(-1, 2, len(logps))).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        values.append((logps.detach(), tokens, grads))
    (a, ta, ga), (b, tb, gb) = values
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-6)
    want = _expected(model, ids, mask, labels).detach()
    torch.testing.assert_close(a, want, atol=atol, rtol=1e-6)
    assert torch.equal(ta, tb)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_pairs_share_their_prompt():
    ids, mask, labels = _pairs()
    packed = pack_rows(ids, mask, labels)
    real = int(mask.sum())
    prompts = 5 + 3 + 7
    assert int((packed.input_ids != 0).sum()) <= real - prompts  # one copy of each prompt
    assert packed.input_ids.numel() < ids.numel()
    # the last prompt token is scored twice (first chosen and first rejected token)
    assert len(packed.source) == int((labels != IGNORE_INDEX).sum())
    assert len(packed.source.unique()) == len(packed.source) - 3
    _compare(_llama(), ids, mask, labels)


def test_distinct_prompts_duplicates_and_unscored_rows():
    p = _tokens(4, 6)
    spec = [
        (p, _tokens(30, 4)),
        (_tokens(5, 2), _tokens(31, 9)),
        (p, _tokens(32, 1)),  # same prompt as row 0, from another example
        (_tokens(6, 8), []),  # no scored token
        (p, _tokens(30, 4)),  # an exact duplicate row
    ]
    _compare(_llama(), *_rows(spec))


def test_three_roles_and_rationale_rows():
    prompt = _tokens(7, 4)
    spec = [(prompt, _tokens(40, 5)), (prompt, _tokens(41, 3)), (prompt, _tokens(42, 11))]
    _compare(_llama(), *_rows(spec))


def test_eager_attention_gets_an_additive_mask():
    _compare(_llama("eager"), *_pairs())


def test_labels_with_gaps_after_the_prompt():
    ids, mask, labels = _pairs()
    labels[0, 6] = IGNORE_INDEX  # an unscored token inside a completion
    _compare(_llama(), ids, mask, labels)


@pytest.mark.parametrize(
    ("rows", "length", "multiple", "want"),
    [
        (8, 199, 64, 200),  # 8 x 200 = 1600 = 25 x 64, 8 extra slots
        (1, 45, 64, 64),  # 19 extra
        (2, 33, 64, 64),  # 62 extra: still fewer than 64
        (16, 5, 64, 8),  # 48 extra
        (3, 100, 64, 100),  # 3 x 128 would add 84 slots, more than the linears' own padding
        (8, 200, 64, 200),  # already a multiple
        (5, 17, 1, 17),  # no alignment asked
    ],
)
def test_aligned_length(rows, length, multiple, want):
    assert _aligned_length(rows, length, multiple) == want


def test_rows_lengthened_to_a_multiple_score_the_same():
    """``row_multiple`` only appends padding slots: the same tokens, positions and scores."""
    ids, mask, labels = _pairs()
    plain = pack_rows(ids, mask, labels)
    aligned = pack_rows(ids, mask, labels, row_multiple=64)
    rows, L = aligned.input_ids.shape
    w = plain.input_ids.shape[1]
    assert rows == plain.input_ids.shape[0] and (rows * L) % 64 == 0 and L > w
    assert torch.equal(aligned.input_ids[:, :w], plain.input_ids)
    assert torch.equal(aligned.position_ids[:, :w], plain.position_ids)
    assert torch.equal(aligned.mask[..., :w, :w], plain.mask)
    assert torch.equal(aligned.targets, plain.targets)
    # the flat source index follows the longer rows
    assert torch.equal(aligned.source // L * w + aligned.source % L, plain.source)
    model = _llama()
    scorer = PolicyLogps(model)
    with torch.no_grad():
        got = []
        for multiple in (1, 64):
            scorer.row_multiple = multiple
            got.append(scorer(ids, mask, labels)[0])
    torch.testing.assert_close(got[1], got[0], atol=2e-5, rtol=1e-6)


def test_left_padding_falls_back_to_the_padded_batch():
    ids, mask, labels = _pairs()
    mask[0, 0] = 0  # a 0 before a 1: not right-padded
    assert pack_rows(ids, mask, labels) is None
    scorer = PolicyLogps(_llama())
    with torch.no_grad():
        got, _ = scorer(ids, mask, labels)
        want, _ = PolicyLogps(scorer.model, packing=False)(ids, mask, labels)
    assert torch.equal(got, want)


def test_unsupported_models_keep_the_padded_batch():
    model = _llama(sliding_window=4)
    assert not packing_supported(model, model.model)
    assert not PolicyLogps(model).packing


def test_bad_label_named_by_row_and_position():
    ids, mask, labels = _pairs()
    labels[4, 5] = V + 3
    with pytest.raises(ValueError, match=r"PolicyLogps: labels\[4, 5\] = 100 is outside"):
        PolicyLogps(_llama())(ids, mask, labels)


def test_trainer_batch_matches_padded_on_bundled_data(assets):
    from transformers import AutoTokenizer

    from fastpref.families.lm_formats import collate, load_rows, tokenize_rows

    tok = AutoTokenizer.from_pretrained(str(assets / "model"))
    model = LlamaForCausalLM.from_pretrained(assets / "model", attn_implementation="sdpa")
    for fmt in ("pair", "pair_rationale"):
        rows = load_rows(str(assets / f"{fmt}.jsonl"), fmt)[:4]
        batch = collate(tokenize_rows(rows, fmt, tok, max_length=256), fmt, tok.pad_token_id)
        _compare(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
