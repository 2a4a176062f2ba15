"""The AEPO tools' models: sentence encoder (pooling, the real all-MiniLM-L6-v2), reward-model
annotation (rendering, batching) and sampling (left padding, seeding)."""

import pytest
import torch
from _aepo_tiny import build_tiny_rm
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from fastpref.models.annotate import RewardAnnotator, render_pair
from fastpref.models.encoder import Encoder, default_embedding_model, pool
from fastpref.models.generate import render_prompt, sample_responses
from fastpref.paths import bundled_tokenizer_path


def test_pool_hand_values():
    """h = [[1, 2], [3, 4], [5, 6]] with mask [1, 1, 0]: mean (1+3)/2, (2+4)/2 = [2, 3];
    cls h_0 = [1, 2]; last attended h_1 = [3, 4] (row 2: left padding, mask [0, 1, 1])."""
    h = torch.tensor([[[1.0, 2], [3, 4], [5, 6]], [[9.0, 9], [1, 1], [2, 4]]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(pool(h, mask, "mean"), torch.tensor([[2.0, 3], [1.5, 2.5]]))
    torch.testing.assert_close(pool(h, mask, "cls"), torch.tensor([[1.0, 2], [9, 9]]))
    torch.testing.assert_close(pool(h, mask, "last"), torch.tensor([[3.0, 4], [2, 4]]))
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(h, mask, "max")


@pytest.fixture(scope="module")
def minilm():
    return Encoder(device="cpu")


def test_minilm_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    texts = [
        "How do I bake bread at home?",
        "A recipe for homemade bread.",
        "The stock market fell sharply today.",
        "x",
        " ".join(["long"] * 400),  # past the 256-token limit: truncated alike
    ]
    ours = minilm.encode(texts, batch_size=2)
    ref = st.SentenceTransformer(str(default_embedding_model()), device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_tensor=True
    )
    assert ours.shape == (5, 384) and minilm.max_length == 256
    torch.testing.assert_close(ours, ref.cpu(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(5))
    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # paraphrases far closer than unrelated text


def test_encoder_errors(tmp_path):
    from fastpref.errors import MissingPathError, ModelError

    with pytest.raises(MissingPathError, match="--embedding-model"):
        Encoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot load it"):
        Encoder(tmp_path / "empty")


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    return build_tiny_rm(tmp_path_factory.mktemp("rm"))


def test_render_plain_and_chat():
    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    p, r = "Tell me about chess.", "Sure! Chess is fun."
    plain = render_pair(tok, p, r, template="plain")
    # the trainer's sequence for a text prompt: BOS + prompt ids, then response ids + EOS
    expected = tok(p)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"]
    assert plain == [*expected, tok.eos_token_id]
    chat = render_pair(tok, p, r, template="auto")  # the bundled tokenizer has a template
    text = tok.apply_chat_template(
        [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
    )
    assert tok.decode(chat) == text
    short = render_pair(tok, p * 30, r, template="plain", max_length=12)
    assert len(short) == 12 and short[0] == tok.bos_token_id and short[-1] == tok.eos_token_id


def test_annotator_scores_do_not_depend_on_batching(tiny_rm):
    prompts = ["Tell me about chess.", "Why do people enjoy music?", "Hi"] * 2
    responses = ["Sure!", "Go away. Music is loud and I hate it.", "A long answer " * 9] * 2
    one = RewardAnnotator(tiny_rm, device="cpu", batch_size=1)
    many = RewardAnnotator(tiny_rm, device="cpu", batch_size=4)
    a, b = one.score(prompts, responses), many.score(prompts, responses)
    assert a == pytest.approx(b, abs=1e-5)
    assert (one.calls, one.batches, many.calls, many.batches) == (6, 6, 6, 2)
    ids = torch.tensor([render_pair(one.tokenizer, prompts[1], responses[1])])
    with torch.no_grad():
        direct = one.model(input_ids=ids).logits[0, 0].item()
    assert a[1] == pytest.approx(direct, abs=1e-5)  # equals the HF model's own head


def test_annotator_refuses_a_multi_label_model(tmp_path, tiny_rm):
    from fastpref.errors import ModelError

    config = LlamaConfig.from_pretrained(tiny_rm, num_labels=3)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_rm).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="num_labels=1"):
        RewardAnnotator(tmp_path, device="cpu")


def test_sampling_left_pads_and_is_seeded(assets):
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(assets / "model")
    model = AutoModelForCausalLM.from_pretrained(assets / "model").eval()
    prompts = ["Tell me about the history of chess and its openings.", "Hi", "Why?"]
    kw = dict(num_responses=2, max_new_tokens=6, batch_size=3)
    a = sample_responses(model, tok, prompts, seed=1, **kw)
    assert a == sample_responses(model, tok, prompts, seed=1, **kw)
    assert a != sample_responses(model, tok, prompts, seed=2, **kw)
    assert len(a) == 3 and all(len(r) == 2 for r in a)
    # a near-zero temperature is greedy decoding: batched (left-padded) equals one by one
    cold = sample_responses(model, tok, prompts, temperature=1e-4, **kw)
    for prompt, got in zip(prompts, cold, strict=True):
        ids = torch.tensor([render_prompt(tok, prompt)])
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)
        alone = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert got == [alone, alone]
