"""Listwise objectives (LiPO-λ, RankNet/FIRST, LambdaRank, ListNet, ListMLE) and RankPO:
hand-derived values, K = 2 reduction, padding, batching, gradient signs, gradcheck.

Lists have K ≤ 6 items: the terms are O(K²) formulas, and small K keeps every hand value
checkable; the padding property covers ragged lists.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpref.losses import (
    ListLogps,
    PairLogps,
    RankPOScores,
    dpo,
    lambdarank_loss,
    lipo,
    lipo_lambda_loss,
    listmle_loss,
    listnet_loss,
    ranknet_first_loss,
    ranknet_loss,
    rankpo,
)

LN2 = math.log(2.0)
INV_LOG2_3 = 1 / math.log2(3.0)
TERMS = {
    "ranknet": ranknet_loss,
    "ranknet_first": ranknet_first_loss,
    "lambda": lambdarank_loss,
    "lipo": lipo_lambda_loss,
    "listnet": listnet_loss,
    "listmle": listmle_loss,
}


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------- hand-derived

# Three items with equal scores (every pair loss is ln 2; ties in rank broken by index, so
# ranks are [1, 2, 3]) and relevance [2, 1, 0] (gains G = 2^rel − 1 = [3, 1, 0]).
EQ_SCORES = torch.zeros(1, 3)
REL = torch.tensor([[2.0, 1.0, 0.0]])


def test_ranknet_hand_value():
    """3 ordered pairs × ln 2."""
    assert ranknet_loss(EQ_SCORES, REL).item() == pytest.approx(3 * LN2, rel=1e-6)


def test_ranknet_first_hand_value():
    """Gold ranks [1, 2, 3]: weights 1/(1+2) + 1/(1+3) + 1/(2+3) = 47/60; × ln 2."""
    assert ranknet_first_loss(EQ_SCORES, REL).item() == pytest.approx(47 / 60 * LN2, rel=1e-6)


def test_lipo_lambda_hand_value():
    """1/D = [1, 1/log2 3, 1/2]. Δ01 = |3−1|·(1 − 1/log2 3), Δ02 = 3·(1 − 1/2),
    Δ12 = 1·(1/log2 3 − 1/2); sum = 2.3690702; × ln 2 = 1.6421178."""
    delta = 2 * (1 - INV_LOG2_3) + 3 * 0.5 + (INV_LOG2_3 - 0.5)
    assert delta == pytest.approx(2.3690702, rel=1e-6)
    assert lipo_lambda_loss(EQ_SCORES, REL).item() == pytest.approx(delta * LN2, rel=1e-6)


def test_lambdarank_hand_value():
    """The LiPO-λ weights divided by IDCG = 3/1 + 1/log2 3 + 0 = 3.6309298."""
    delta = 2 * (1 - INV_LOG2_3) + 3 * 0.5 + (INV_LOG2_3 - 0.5)
    idcg = 3 + INV_LOG2_3
    assert lambdarank_loss(EQ_SCORES, REL).item() == pytest.approx(delta / idcg * LN2, rel=1e-6)


def test_lambda_weights_follow_current_ranking():
    """Scores [0, 1, 2] rank the items [3, 2, 1] (reversed): now 1/D = [1/2, 1/log2 3, 1], so
    Δ01 = 2·(1/log2 3 − 1/2), Δ02 = 3·(1 − 1/2), Δ12 = 1·(1 − 1/log2 3); the pair losses are
    sp(1), sp(2), sp(1) for s_i − s_j = −1, −2, −1."""
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    expected = (
        2 * (INV_LOG2_3 - 0.5) * softplus(1.0)
        + 1.5 * softplus(2.0)
        + (1 - INV_LOG2_3) * softplus(1.0)
    )
    assert lipo_lambda_loss(scores, REL).item() == pytest.approx(expected, rel=1e-6)


def test_listnet_hand_value():
    """scores log [1, 2, 3] ⇒ softmax [1/6, 2/6, 3/6]; equal relevance ⇒ uniform target:
    −(1/3)(ln 1/6 + ln 1/3 + ln 1/2) = ln(36)/3 = 1.1945348."""
    scores = torch.log(torch.tensor([[1.0, 2.0, 3.0]]))
    value = listnet_loss(scores, torch.ones(1, 3)).item()
    assert value == pytest.approx(math.log(36) / 3, rel=1e-6)


def test_listmle_hand_value():
    """Equal scores, gold order [0, 1, 2]: −[(0 − ln 3) + (0 − ln 2) + (0 − 0)] = ln 6."""
    assert listmle_loss(EQ_SCORES, REL).item() == pytest.approx(math.log(6.0), rel=1e-6)


def test_lipo_hand_value_and_metrics():
    """β = 1, π_ref = 0: rewards = log-probs = [0, 0, 0] ⇒ the LiPO-λ hand value above.
    Best-labelled response is item 0, worst item 2; ties count as unordered (accuracy 0)."""
    inputs = ListLogps(
        logps=torch.zeros(1, 3),
        tokens=torch.ones(1, 3),
        scores=REL,
        mask=torch.ones(1, 3, dtype=torch.bool),
        ref_logps=torch.zeros(1, 3),
    )
    loss, m = lipo(inputs, beta=1.0)
    delta = 2 * (1 - INV_LOG2_3) + 3 * 0.5 + (INV_LOG2_3 - 0.5)
    assert loss.item() == pytest.approx(delta * LN2, rel=1e-6)
    assert m.rewards_accuracies.item() == 0.5  # every pair a tie: ½ each, as held-out accuracy
    inputs.logps = torch.tensor([[-1.0, -2.0, -3.0]])
    _, m = lipo(inputs, beta=1.0)
    assert m.rewards_accuracies.item() == 1.0
    assert m.rewards_chosen.item() == -1.0 and m.rewards_rejected.item() == -3.0


# --------------------------------------------------------------------------- properties


logp = st.floats(-30.0, 0.0, allow_nan=False, width=32)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(logp, logp, logp, logp, st.integers(0, 4), st.integers(0, 4)).filter(
            lambda r: r[4] != r[5]
        ),
        min_size=1,
        max_size=4,
    ),
    st.floats(0.01, 2.0),
)
def test_lipo_with_two_responses_is_scaled_dpo(rows, beta):
    """K = 2: the only pair has Δ = |G_1 − G_2|·(1/log2 2 − 1/log2 3) whatever the current
    order, so LiPO-λ = mean_b Δ_b·DPO_b with the higher-labelled response as chosen."""
    logps = torch.tensor([[r[0], r[1]] for r in rows])
    ref = torch.tensor([[r[2], r[3]] for r in rows])
    psi = torch.tensor([[float(r[4]), float(r[5])] for r in rows])
    inputs = ListLogps(
        logps, torch.ones_like(logps), psi, torch.ones_like(psi, dtype=torch.bool), ref
    )
    hi = psi.argmax(-1, keepdim=True)
    lo = 1 - hi
    per_pair = torch.stack(
        [
            dpo(
                PairLogps(
                    logps.gather(1, hi)[b],
                    logps.gather(1, lo)[b],
                    torch.ones(1),
                    torch.ones(1),
                    ref.gather(1, hi)[b],
                    ref.gather(1, lo)[b],
                ),
                beta=beta,
            )[0]
            for b in range(len(rows))
        ]
    )
    gain = torch.exp2(psi) - 1
    scale = (gain[:, 0] - gain[:, 1]).abs() * (1 - INV_LOG2_3)
    torch.testing.assert_close(lipo(inputs, beta=beta)[0], (scale * per_pair).mean())


item = st.tuples(st.floats(-5.0, 5.0, width=32), st.integers(0, 3))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    st.lists(st.lists(item, min_size=1, max_size=5), min_size=1, max_size=3),
    st.sampled_from(sorted(TERMS)),
    st.integers(0, 2**31 - 1),
)
def test_padded_batch_equals_each_list_alone(lists, kind, seed):
    """Ragged lists padded to K with garbage scores/labels give, per list, exactly the value
    of the unpadded list on its own."""
    fn = TERMS[kind]
    k = max(len(items) for items in lists)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(len(lists), k, generator=g) * 100
    rel = torch.randint(0, 9, (len(lists), k), generator=g).float()
    mask = torch.zeros(len(lists), k, dtype=torch.bool)
    for b, items in enumerate(lists):
        n = len(items)
        scores[b, :n] = torch.tensor([s for s, _ in items])
        rel[b, :n] = torch.tensor([float(r) for _, r in items])
        mask[b, :n] = True
    batched = fn(scores, rel, mask)
    assert batched.shape == (len(lists),)
    for b, items in enumerate(lists):
        n = len(items)
        alone = fn(scores[b : b + 1, :n], rel[b : b + 1, :n])
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [1.0, 0.3])
@pytest.mark.parametrize("kind", sorted(TERMS))
def test_agrees_with_the_listwise_op_reference(kind, sigma):
    """Two independent implementations of the same definitions: these terms and the op's
    plain-PyTorch reference (``fastpref.ops.listwise_loss(backend="reference")``), on ragged
    lists with tied relevance and tied scores."""
    from fastpref.ops import listwise_loss

    g = torch.Generator().manual_seed(2)
    scores = torch.randn(5, 6, generator=g, dtype=torch.float64)
    scores[0, 1] = scores[0, 3]  # a tie in the current ranking
    rel = torch.randint(0, 4, (5, 6), generator=g).double()
    mask = torch.rand(5, 6, generator=g) > 0.3
    op_kind, weighting = {"ranknet_first": ("ranknet", "first")}.get(kind, (kind, None))
    expected = listwise_loss(
        scores, rel, mask, kind=op_kind, weighting=weighting, sigma=sigma, backend="reference"
    )
    torch.testing.assert_close(TERMS[kind](scores, rel, mask, sigma=sigma), expected)


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_all_padded_list_is_zero_with_finite_gradient(kind):
    scores = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    out = TERMS[kind](scores, torch.tensor([[1.0, 0.0, 3.0, 2.0]] * 2), mask)
    assert out[1].item() == 0.0
    out.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[:, 2:] == 0).all() and (scores.grad[1] == 0).all()


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_raising_the_most_relevant_score_lowers_the_loss(kind):
    scores = torch.tensor([[0.3, 0.5, -0.2, 0.1]], requires_grad=True)
    TERMS[kind](scores, torch.tensor([[3.0, 1.0, 0.0, 2.0]])).sum().backward()
    assert scores.grad[0, 0] < 0 and scores.grad[0, 2] > 0


def test_lipo_batched_equals_mean_of_each_list_alone():
    """Ragged lists (K = 4, 2 and 3 real responses) batched with padding give the mean of
    the lists' own LiPO-λ losses; padded responses carry garbage that must not matter."""
    g = torch.Generator().manual_seed(3)
    logps, ref = -torch.rand(3, 4, generator=g) * 10, -torch.rand(3, 4, generator=g) * 10
    psi = torch.randint(0, 5, (3, 4), generator=g).float()
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, True, True, False]])
    logps[~mask], ref[~mask], psi[~mask] = 1e4, -1e4, 100.0
    batched, _ = lipo(ListLogps(logps, torch.ones(3, 4), psi, mask, ref), beta=0.5)
    alone = []
    for b, n in enumerate([4, 2, 3]):
        one = ListLogps(
            logps[b : b + 1, :n],
            torch.ones(1, n),
            psi[b : b + 1, :n],
            torch.ones(1, n, dtype=torch.bool),
            ref[b : b + 1, :n],
        )
        alone.append(lipo(one, beta=0.5)[0])
    torch.testing.assert_close(batched, torch.stack(alone).mean())


def test_lipo_gradient_sign():
    logps = torch.tensor([[-3.0, -2.0, -4.0]], requires_grad=True)
    inputs = ListLogps(
        logps,
        torch.ones(1, 3),
        torch.tensor([[2.0, 0.0, 1.0]]),
        torch.ones(1, 3, dtype=torch.bool),
        torch.full((1, 3), -3.0),
    )
    lipo(inputs)[0].backward()
    assert logps.grad[0, 0] < 0 and logps.grad[0, 1] > 0


@pytest.mark.parametrize("kind", ["lambda", "lipo", "listnet", "listmle", "ranknet_first"])
def test_gradcheck_float64(kind):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    rel = torch.tensor([[3.0, 1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True], [True, False, True, True]])
    assert torch.autograd.gradcheck(lambda s: TERMS[kind](s, rel, mask), (scores,))


# --------------------------------------------------------------------------- RankPO


def scores(c, r, rc=None, rr=None):
    def opt(v):
        return None if v is None else torch.tensor(v)

    return RankPOScores(torch.tensor(c), torch.tensor(r), opt(rc), opt(rr))


def test_rankpo_hand_values():
    """s = (0.8, 0.3), s_ref = (0.6, 0.4), τ = 0.5, β = 1, γ = 0.
    reference-based: a = 0.5 − 0.2 = 0.3 ⇒ z = 0.6 ⇒ sp(−0.6) = 0.4374879; hinge 1 − 0.6 = 0.4;
    reference-free: a = 0.5 ⇒ z = 1 ⇒ sp(−1) = 0.3132617;
    γ = 0.2: z = 0.6 − 0.2 = 0.4 ⇒ sp(−0.4) = 0.5130153;
    2-way CE: −log softmax([0.8, 0.3]/0.5)[0] = sp(−1) = 0.3132617, × sft_weight 2 = 0.6265234."""
    x = scores([0.8], [0.3], [0.6], [0.4])
    assert rankpo(x, tau=0.5)[0].item() == pytest.approx(softplus(-0.6), rel=1e-5)
    assert rankpo(x, tau=0.5, loss_type="hinge")[0].item() == pytest.approx(0.4, rel=1e-5)
    assert rankpo(x, tau=0.5, reference_free=True)[0].item() == pytest.approx(0.3132617, rel=1e-5)
    assert rankpo(x, tau=0.5, gamma=0.2)[0].item() == pytest.approx(softplus(-0.4), rel=1e-5)
    loss, m = rankpo(x, tau=0.5, sft_weight=2.0)
    assert m.sft_loss.item() == pytest.approx(0.3132617, rel=1e-5)
    assert loss.item() == pytest.approx(softplus(-0.6) + 2 * 0.3132617, rel=1e-5)
    assert m.rewards_chosen.item() == pytest.approx(0.2, rel=1e-5)


def test_rankpo_equal_to_reference_is_ln2():
    x = scores([0.8, 0.1], [0.3, 0.5], [0.8, 0.1], [0.3, 0.5])
    assert rankpo(x)[0].item() == pytest.approx(LN2, rel=1e-6)


cos = st.floats(-1.0, 1.0, width=32)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.lists(st.tuples(cos, cos, cos, cos, cos, cos), min_size=1, max_size=5))
def test_reference_free_rankpo_ignores_reference_scores(rows):
    c, r, rc1, rr1, rc2, rr2 = zip(*rows, strict=True)
    a = rankpo(scores(c, r, rc1, rr1), reference_free=True, sft_weight=0.5)[0]
    b = rankpo(scores(c, r, rc2, rr2), reference_free=True, sft_weight=0.5)[0]
    none = rankpo(scores(c, r), reference_free=True, sft_weight=0.5)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, none)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(cos, cos, cos, cos), min_size=2, max_size=5),
    st.sampled_from(["sigmoid", "hinge"]),
)
def test_rankpo_batched_equals_mean_of_one_at_a_time(rows, loss_type):
    c, r, rc, rr = zip(*rows, strict=True)
    batched = rankpo(scores(c, r, rc, rr), loss_type=loss_type, sft_weight=0.3)[0]
    singles = [
        rankpo(scores(*([v] for v in row)), loss_type=loss_type, sft_weight=0.3)[0] for row in rows
    ]
    torch.testing.assert_close(batched, torch.stack(singles).mean(), rtol=1e-5, atol=1e-5)


def test_rankpo_gradient_signs_and_gradcheck():
    """Without label smoothing the sigmoid and the CE term both push s_c up and s_r down;
    (with ε > 0 a confidently ordered pair is pushed back, by design, so gradcheck only)."""
    c = torch.tensor([0.2, 0.7], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.4, 0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.3, 0.3], dtype=torch.float64)

    def f(c, r, label_smoothing=0.0):
        x = RankPOScores(c, r, ref, ref.flip(0))
        return rankpo(x, tau=0.1, sft_weight=0.5, label_smoothing=label_smoothing)[0]

    f(c, r).backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()
    c, r = c.detach().requires_grad_(), r.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda c, r: f(c, r, 0.1), (c, r))
