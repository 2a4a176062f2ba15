"""Pairwise, unpaired and reward objectives: hand-derived values, limits, gradient signs,
batched vs one-at-a-time equality and float64 gradcheck.

Shapes are tiny (B ≤ 6): these are scalar formulas over per-sequence log-probs, so
correctness does not depend on size and the whole file runs in about a second.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpref.families import OBJECTIVES as LOSSES
from fastpref.losses import (
    KTOLogps,
    PairLogps,
    RewardScores,
    SFTLogps,
    cdpo,
    cpo,
    dpo,
    hinge,
    ipo,
    kto,
    orpo,
    rdpo,
    rm,
    robust,
    rorpo,
    sft,
    simpo,
)
from fastpref.losses.reference_free import log1mexp

LN2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def pair(
    chosen,
    rejected,
    ref_chosen=None,
    ref_rejected=None,
    chosen_tokens=None,
    rejected_tokens=None,
    rationale=None,
    rationale_tokens=None,
    dtype=torch.float32,
) -> PairLogps:
    def opt(v):
        return None if v is None else torch.as_tensor(v, dtype=dtype)

    chosen = torch.as_tensor(chosen, dtype=dtype)
    ones = torch.ones_like(chosen)
    return PairLogps(
        chosen=chosen,
        rejected=torch.as_tensor(rejected, dtype=dtype),
        chosen_tokens=ones if chosen_tokens is None else opt(chosen_tokens),
        rejected_tokens=ones if rejected_tokens is None else opt(rejected_tokens),
        ref_chosen=opt(ref_chosen),
        ref_rejected=opt(ref_rejected),
        rationale=opt(rationale),
        rationale_tokens=opt(rationale_tokens),
    )


# --------------------------------------------------------------------------- hand-derived


@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust"])
def test_sigmoid_family_is_ln2_when_policy_equals_reference(name):
    """π = π_ref ⇒ h = 0 ⇒ −log σ(0) = ln 2; cDPO: (1−ε)ln 2 + ε ln 2 = ln 2;
    robust: ((1−ε)ln 2 − ε ln 2)/(1 − 2ε) = ln 2. Any β, any log-probs."""
    inputs = pair([-3.0, -7.5, -1.0], [-2.0, -9.0, -4.0], [-3.0, -7.5, -1.0], [-2.0, -9.0, -4.0])
    for beta in (0.05, 0.1, 2.0):
        loss, metrics = LOSSES[name](inputs, beta=beta)
        assert loss.item() == pytest.approx(LN2, abs=1e-6)
        assert metrics.rewards_margins.item() == 0.0


def test_ipo_and_hinge_when_policy_equals_reference():
    """h̄ = 0 ⇒ IPO = (0 − 1/(2β))² = 1/(4β²) = 25 at β = 0.1; hinge = max(0, 1 − 0) = 1."""
    inputs = pair([-3.0, -1.0], [-2.0, -4.0], [-3.0, -1.0], [-2.0, -4.0], [3, 1], [2, 5])
    assert ipo(inputs, beta=0.1)[0].item() == pytest.approx(25.0, rel=1e-6)
    assert hinge(inputs, beta=0.1)[0].item() == pytest.approx(1.0)


def test_dpo_hand_value():
    """log-ratios: chosen +1, rejected −1 ⇒ h = 2; β = 0.5 ⇒ βh = 1;
    L = −log σ(1) = log(1 + e^−1) = 0.3132617. Rewards 0.5 and −0.5, accuracy 1."""
    inputs = pair([-1.0], [-5.0], [-2.0], [-4.0])
    loss, m = dpo(inputs, beta=0.5)
    assert loss.item() == pytest.approx(softplus(-1.0), rel=1e-6)
    assert loss.item() == pytest.approx(0.3132617, rel=1e-6)
    assert m.rewards_chosen.item() == pytest.approx(0.5)
    assert m.rewards_rejected.item() == pytest.approx(-0.5)
    assert m.rewards_accuracies.item() == 1.0
    assert m.logps_chosen.item() == -1.0 and m.logps_rejected.item() == -5.0


def test_cdpo_and_robust_hand_values():
    """z = βh = 1, ε = 0.25. Using softplus(x) − softplus(−x) = x:
    cDPO = 0.75·sp(−1) + 0.25·sp(1) = sp(−1) + 0.25 = 0.5632617;
    robust = [0.75·sp(−1) − 0.25·sp(1)]/0.5 = sp(−1) − 0.25/0.5 = −0.1867383."""
    inputs = pair([-1.0], [-5.0], [-2.0], [-4.0])
    assert cdpo(inputs, beta=0.5, label_smoothing=0.25)[0].item() == pytest.approx(
        0.5632617, rel=1e-6
    )
    assert robust(inputs, beta=0.5, label_smoothing=0.25)[0].item() == pytest.approx(
        -0.1867383, rel=1e-5
    )


def test_ipo_hand_value_uses_token_means():
    """chosen log-ratio 4 over 2 tokens → 2; rejected −3 over 3 tokens → −1; h̄ = 3;
    β = 0.5 ⇒ target 1/(2β) = 1 ⇒ L = (3 − 1)² = 4."""
    inputs = pair([-2.0], [-9.0], [-6.0], [-6.0], chosen_tokens=[2.0], rejected_tokens=[3.0])
    loss, m = ipo(inputs, beta=0.5)
    assert loss.item() == pytest.approx(4.0, rel=1e-6)
    assert m.rewards_chosen.item() == pytest.approx(1.0)  # β·(token-mean log-ratio)


def test_hinge_hand_values():
    """β = 0.5: h = 1 ⇒ max(0, 1 − 0.5) = 0.5; h = 4 ⇒ max(0, 1 − 2) = 0; mean 0.25."""
    inputs = pair([0.0, 0.0], [-1.0, -4.0], [0.0, 0.0], [0.0, 0.0])
    assert hinge(inputs, beta=0.5)[0].item() == pytest.approx(0.25)


def test_simpo_hand_value():
    """chosen −2 over 4 tokens = −0.5; rejected −3 over 2 = −1.5; β = 2, γ = 1:
    z = 2·(1) − 1 = 1 ⇒ L = sp(−1) = 0.3132617. With α = 1 the chosen NLL 2/4 = 0.5 is added."""
    inputs = pair([-2.0], [-3.0], chosen_tokens=[4.0], rejected_tokens=[2.0])
    loss, m = simpo(inputs, beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(0.3132617, rel=1e-6)
    assert m.rewards_chosen.item() == pytest.approx(-1.0)
    assert simpo(inputs, beta=2.0, gamma=1.0, alpha=1.0)[0].item() == pytest.approx(0.8132617)


def test_cpo_hand_value():
    """Δ = −2 − (−12) = 10, β = 0.1 ⇒ sp(−1) = 0.3132617; NLL = 2/4 tokens = 0.5; α = 1:
    L = 0.8132617. Rewards are β·log π: −0.2 and −1.2."""
    inputs = pair([-2.0], [-12.0], chosen_tokens=[4.0], rejected_tokens=[6.0])
    loss, m = cpo(inputs, beta=0.1, alpha=1.0)
    assert loss.item() == pytest.approx(0.8132617, rel=1e-6)
    assert m.nll_loss.item() == pytest.approx(0.5)
    assert m.rewards_rejected.item() == pytest.approx(-1.2)


def test_orpo_hand_value():
    """Mean token probabilities p_c = 0.5 (3 tokens), p_r = 0.2 (2 tokens).
    odds: 1 and 0.25 ⇒ log odds ratio = ln 4; log σ(ln 4) = ln(4/5).
    NLL = ln 2 (token mean); λ = β = 0.1 ⇒ L = ln 2 − 0.1·ln 0.8 = 0.7154616."""
    inputs = pair(
        [3 * math.log(0.5)], [2 * math.log(0.2)], chosen_tokens=[3.0], rejected_tokens=[2.0]
    )
    loss, m = orpo(inputs, beta=0.1)
    assert loss.item() == pytest.approx(LN2 - 0.1 * math.log(0.8), rel=1e-6)
    assert loss.item() == pytest.approx(0.7154616, rel=1e-6)
    assert m.log_odds_chosen.item() == pytest.approx(math.log(4.0), rel=1e-6)
    assert m.log_odds_ratio.item() == pytest.approx(math.log(0.8), rel=1e-6)
    assert m.nll_loss.item() == pytest.approx(LN2, rel=1e-6)


def test_rdpo_hand_values_both_rationale_terms():
    """π = π_ref ⇒ DPO part ln 2. Rationale Σ log p = [−2, −4], γ = 0.5.
    paper (nll): ln 2 + 0.5·mean(2, 4) = ln 2 + 1.5 = 2.1931472;
    released code (logsigmoid): ln 2 + mean(sp(1), sp(2)) = ln 2 + 1.7200948 = 2.4132420."""
    inputs = pair(
        [-1.0, -2.0],
        [-3.0, -1.0],
        [-1.0, -2.0],
        [-3.0, -1.0],
        rationale=[-2.0, -4.0],
        rationale_tokens=[2.0, 2.0],
    )
    nll, m = rdpo(inputs, beta=0.1, gamma=0.5)
    assert nll.item() == pytest.approx(LN2 + 1.5, rel=1e-6)
    logsig, _ = rdpo(inputs, beta=0.1, gamma=0.5, rationale_term="logsigmoid")
    assert logsig.item() == pytest.approx(LN2 + (softplus(1.0) + softplus(2.0)) / 2, rel=1e-6)
    assert logsig.item() == pytest.approx(2.4132420, rel=1e-6)
    assert m.logps_rationale.item() == -3.0
    assert m.rationale_nll.item() == pytest.approx(1.5)  # 6 nats over 4 tokens


def test_rorpo_hand_value():
    """ORPO part as in test_orpo_hand_value (0.7154616, same for both rows); rationale
    token-mean NLL: [2/2, 6/3] = [1, 2], mean 1.5; γ = 0.5 ⇒ L = 0.7154616 + 0.75."""
    c, r = 3 * math.log(0.5), 2 * math.log(0.2)
    inputs = pair(
        [c, c],
        [r, r],
        chosen_tokens=[3.0, 3.0],
        rejected_tokens=[2.0, 2.0],
        rationale=[-2.0, -6.0],
        rationale_tokens=[2.0, 3.0],
    )
    loss, _ = rorpo(inputs, beta=0.1, gamma=0.5)
    assert loss.item() == pytest.approx(0.7154616 + 0.75, rel=1e-6)


def kto_inputs(completion, ref_completion, kl, ref_kl, label, dtype=torch.float32):
    n = len(completion)
    return KTOLogps(
        completion=t(*completion, dtype=dtype),
        completion_tokens=torch.ones(n, dtype=dtype),
        kl=t(*kl, dtype=dtype),
        kl_tokens=torch.ones(n, dtype=dtype),
        label=torch.tensor(label),
        ref_completion=t(*ref_completion, dtype=dtype),
        ref_kl=t(*ref_kl, dtype=dtype),
    )


def test_kto_hand_values():
    """β = 0.5. r = [2, −2] (desirable, undesirable); KL log-ratios [1, 3] ⇒ z₀ = 2.
    desirable: 1 − σ(0.5·(2 − 2)) = 0.5; undesirable: 1 − σ(0.5·(2 + 2)) = 1 − σ(2) = 0.1192029.
    Weights (1, 1): mean 0.3096015; weights (2, 1): (1.0 + 0.1192029)/2 = 0.5596015."""
    inputs = kto_inputs([-1.0, -6.0], [-3.0, -4.0], [-1.0, 0.0], [-2.0, -3.0], [True, False])
    loss, m = kto(inputs, beta=0.5)
    sig2 = 1 / (1 + math.exp(-2.0))
    assert loss.item() == pytest.approx((0.5 + 1 - sig2) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.3096015, rel=1e-6)
    assert m.kl.item() == pytest.approx(2.0)
    assert m.rewards_chosen.item() == pytest.approx(1.0)
    assert m.rewards_rejected.item() == pytest.approx(-1.0)
    weighted, _ = kto(inputs, beta=0.5, desirable_weight=2.0)
    assert weighted.item() == pytest.approx(0.5596015, rel=1e-6)


def test_kto_reference_point_is_clamped_and_detached():
    """KL log-ratios [−1, −3] ⇒ mean −2 ⇒ z₀ = 0. r = [2, −2], β = 0.5:
    both terms are 1 − σ(1) = 0.2689414. z₀ carries no gradient to the KL completions."""
    inputs = kto_inputs([-1.0, -6.0], [-3.0, -4.0], [-3.0, -3.0], [-2.0, 0.0], [True, False])
    inputs.kl.requires_grad_(True)
    inputs.completion.requires_grad_(True)
    loss, m = kto(inputs, beta=0.5)
    assert m.kl.item() == 0.0
    assert loss.item() == pytest.approx(1 - 1 / (1 + math.exp(-1.0)), rel=1e-6)
    inputs2 = kto_inputs([-1.0, -6.0], [-3.0, -4.0], [5.0, 5.0], [-2.0, 0.0], [True, False])
    inputs2.kl.requires_grad_(True)
    inputs2.completion.requires_grad_(True)
    loss2, _ = kto(inputs2, beta=0.5)
    (loss + loss2).backward()
    assert inputs.kl.grad is None and inputs2.kl.grad is None
    assert inputs.completion.grad is not None


def test_kto_policy_equals_reference_is_one_half():
    """r = 0, z₀ = 0 ⇒ every term is 1 − σ(0) = 0.5."""
    inputs = kto_inputs(
        [-1.0, -6.0, -2.0], [-1.0, -6.0, -2.0], [-4.0] * 3, [-4.0] * 3, [True, False, True]
    )
    assert kto(inputs)[0].item() == pytest.approx(0.5)


def test_kto_metrics_nan_for_empty_side():
    """A batch with only desirable examples has no undesirable mean: NaN (no host sync)."""
    inputs = kto_inputs([-1.0, -2.0], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0], [True, True])
    _, m = kto(inputs)
    assert math.isnan(m.rewards_rejected.item()) and not math.isnan(m.rewards_chosen.item())


def test_rm_hand_values():
    """r_c = 2, r_r = 1, m = 0.5 ⇒ −log σ(0.5) = sp(−0.5) = 0.4740770; centering c = 0.01
    adds 0.01·(2 + 1)² = 0.09. Equal rewards and no margin ⇒ ln 2."""
    inputs = RewardScores(chosen=t(2.0), rejected=t(1.0), margin=t(0.5))
    assert rm(inputs)[0].item() == pytest.approx(0.4740770, rel=1e-6)
    centered, _ = rm(inputs, center_rewards_coefficient=0.01)
    assert centered.item() == pytest.approx(0.5640770, rel=1e-6)
    assert rm(RewardScores(chosen=t(0.3, -1.0), rejected=t(0.3, -1.0)))[0].item() == (
        pytest.approx(LN2)
    )


def test_sft_is_batch_token_mean():
    """Σ log p = [−2, −6] over [1, 3] tokens ⇒ (2 + 6)/(1 + 3) = 2 (not mean(2, 2) = 2 by
    coincidence: with [−2, −3] over [1, 3] it is 5/4, not mean(2, 1) = 1.5)."""
    assert sft(SFTLogps(t(-2.0, -6.0), t(1.0, 3.0)))[0].item() == pytest.approx(2.0)
    assert sft(SFTLogps(t(-2.0, -3.0), t(1.0, 3.0)))[0].item() == pytest.approx(1.25)


# --------------------------------------------------------------------------- limits


finite = st.floats(-20.0, 0.0, allow_nan=False, width=32)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=5),
    st.floats(0.01, 3.0),
)
def test_zero_smoothing_reduces_cdpo_and_robust_to_dpo(rows, beta):
    inputs = pair(*zip(*rows, strict=True))
    expected = dpo(inputs, beta=beta)[0]
    torch.testing.assert_close(cdpo(inputs, beta=beta, label_smoothing=0.0)[0], expected)
    torch.testing.assert_close(robust(inputs, beta=beta, label_smoothing=0.0)[0], expected)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.lists(st.tuples(finite, finite, finite, finite, finite), min_size=1, max_size=5))
def test_rdpo_with_zero_gamma_is_dpo(rows):
    c, r, rc, rr, rat = zip(*rows, strict=True)
    inputs = pair(c, r, rc, rr, rationale=rat, rationale_tokens=[3.0] * len(c))
    expected = dpo(inputs, beta=0.1)[0]
    torch.testing.assert_close(rdpo(inputs, beta=0.1, gamma=0.0)[0], expected)
    logsig = rdpo(inputs, beta=0.1, gamma=0.0, rationale_term="logsigmoid")[0]
    torch.testing.assert_close(logsig, expected + LN2)


def test_rorpo_with_zero_gamma_is_orpo():
    inputs = pair(
        [-3.0, -2.0],
        [-5.0, -1.0],
        chosen_tokens=[3, 2],
        rejected_tokens=[4, 2],
        rationale=[-4.0, -9.0],
        rationale_tokens=[2, 3],
    )
    torch.testing.assert_close(rorpo(inputs, gamma=0.0)[0], orpo(inputs)[0])


def test_cpo_with_zero_alpha_is_reference_free_dpo():
    """CPO without its NLL term is DPO with a zero reference."""
    inputs = pair([-3.0, -2.0], [-5.0, -1.0])
    zero = pair([-3.0, -2.0], [-5.0, -1.0], [0.0, 0.0], [0.0, 0.0])
    torch.testing.assert_close(cpo(inputs, alpha=0.0)[0], dpo(zero, beta=0.1)[0])


def test_log1mexp_is_accurate_where_the_naive_form_is_not():
    """log(1 − eˣ) in float32 against the float64 reference log(−expm1(x)); near 0 the naive
    log1p(−exp(x)) rounds exp(x) to 1 and returns −inf."""
    xs = [-1e-10, -1e-6, -0.1, -0.6931, -0.7, -1.0, -20.0, -80.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float32))
    ref = torch.tensor([math.log(-math.expm1(x)) for x in xs], dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-30)
    assert torch.isinf(torch.log1p(-torch.exp(torch.tensor(-1e-10))))


def test_orpo_two_certain_completions_are_finite():
    """log p = 0 for both (p = 1 in floating point): the odds ratio of two certain completions
    is taken as 1 (log p capped at −eps), so L = 0 − 0.1·log σ(0) = 0.1·ln 2, not NaN."""
    loss, m = orpo(pair([0.0, 0.0], [0.0, 0.0]), beta=0.1)
    assert loss.item() == pytest.approx(0.1 * LN2, rel=1e-6)
    assert m.log_odds_chosen.item() == 0.0


def test_orpo_gradient_is_finite_near_certain_completions():
    chosen = torch.tensor([-1e-6, -30.0], requires_grad=True)
    inputs = pair(chosen, torch.tensor([-2.0, -1e-7]))
    inputs.chosen = chosen
    orpo(inputs)[0].backward()
    assert torch.isfinite(chosen.grad).all()


# --------------------------------------------------------------------------- gradient signs


PAIR_LOSSES = ["dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "cpo", "orpo", "rdpo", "rorpo"]


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_raising_chosen_lowers_loss_raising_rejected_raises_it(name):
    """At a point where every loss is active (hinge margin < 1/β), ∂L/∂log π(y_c) < 0 and
    ∂L/∂log π(y_r) > 0."""
    chosen = torch.tensor([-4.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -5.0], requires_grad=True)
    inputs = pair(
        chosen,
        rejected,
        [-4.5, -5.0],
        [-4.0, -6.0],
        [4.0, 5.0],
        [4.0, 3.0],
        rationale=[-8.0, -3.0],
        rationale_tokens=[4.0, 2.0],
    )
    inputs.chosen, inputs.rejected = chosen, rejected
    loss, _ = LOSSES[name](inputs)
    loss.backward()
    assert (chosen.grad < 0).all(), chosen.grad
    assert (rejected.grad > 0).all(), rejected.grad


def test_rationale_terms_reward_a_likelier_rationale():
    for name, kwargs in [("rdpo", {}), ("rdpo", {"rationale_term": "logsigmoid"}), ("rorpo", {})]:
        rationale = torch.tensor([-8.0, -3.0], requires_grad=True)
        inputs = pair(
            [-4.0, -6.0],
            [-5.0, -5.0],
            [-4.5, -5.0],
            [-4.0, -6.0],
            rationale=rationale,
            rationale_tokens=[4.0, 2.0],
        )
        inputs.rationale = rationale
        LOSSES[name](inputs, **kwargs)[0].backward()
        assert (rationale.grad < 0).all(), (name, kwargs)


def test_kto_gradient_signs():
    """Raising a desirable completion's log p lowers the loss; raising an undesirable one's
    raises it."""
    inputs = kto_inputs([-1.0, -6.0], [-3.0, -4.0], [-1.0, 0.0], [-2.0, -3.0], [True, False])
    inputs.completion.requires_grad_(True)
    kto(inputs)[0].backward()
    assert inputs.completion.grad[0] < 0 < inputs.completion.grad[1]


def test_rm_and_sft_gradient_signs():
    chosen, rejected = t(0.5, -1.0).requires_grad_(), t(0.0, 2.0).requires_grad_()
    rm(RewardScores(chosen, rejected))[0].backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    logps = t(-2.0, -3.0).requires_grad_()
    sft(SFTLogps(logps, t(2.0, 3.0)))[0].backward()
    assert (logps.grad < 0).all()


# --------------------------------------------------------------------------- batching


def _row(inputs, i):
    fields = {k: (None if v is None else v[i : i + 1]) for k, v in vars(inputs).items()}
    return type(inputs)(**fields)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(finite, finite, finite, finite, finite), min_size=2, max_size=6),
    st.sampled_from(PAIR_LOSSES + ["rm"]),
)
def test_batched_equals_mean_of_one_at_a_time(rows, name):
    """Every per-example mean equals the mean of B single-example losses. The token-mean
    NLL terms (cpo, orpo, rorpo) are means over the batch's tokens, so rows share token counts
    here: with unequal counts longer completions weigh more, by design (see sft)."""
    c, r, rc, rr, rat = zip(*rows, strict=True)
    n = len(c)
    if name == "rm":
        inputs = RewardScores(t(*c), t(*r), margin=t(*rc))
    else:
        inputs = pair(c, r, rc, rr, [3.0] * n, [3.0] * n, rationale=rat, rationale_tokens=[2.0] * n)
    batched, _ = LOSSES[name](inputs)
    singles = torch.stack([LOSSES[name](_row(inputs, i))[0] for i in range(n)])
    torch.testing.assert_close(batched, singles.mean(), rtol=1e-5, atol=1e-5)


def test_kto_is_invariant_to_batch_order():
    """KTO's z₀ is a batch statistic, so one-at-a-time differs by design; the batch loss does
    not depend on the order of its examples."""
    inputs = kto_inputs(
        [-1.0, -6.0, -2.0],
        [-3.0, -4.0, -2.5],
        [-1.0, 0.0, -2.0],
        [-2.0, -3.0, -1.0],
        [True, False, True],
    )
    perm = torch.tensor([2, 0, 1])
    permuted = KTOLogps(**{k: v[perm] for k, v in vars(inputs).items()})
    torch.testing.assert_close(kto(inputs)[0], kto(permuted)[0])


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name", ["dpo", "robust", "ipo", "simpo", "orpo", "rdpo", "rorpo"])
def test_gradcheck_float64(name):
    g = torch.Generator().manual_seed(0)
    chosen = (-torch.rand(3, generator=g, dtype=torch.float64) * 5 - 0.1).requires_grad_()
    rejected = (-torch.rand(3, generator=g, dtype=torch.float64) * 5 - 0.1).requires_grad_()
    rationale = (-torch.rand(3, generator=g, dtype=torch.float64) * 5).requires_grad_()
    tokens = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    ref_c, ref_r = torch.full_like(tokens, -2.0), torch.full_like(tokens, -3.0)

    def f(c, r, rat):
        inputs = PairLogps(c, r, tokens, tokens.flip(0), ref_c, ref_r, rat, tokens)
        return LOSSES[name](inputs)[0]

    assert torch.autograd.gradcheck(f, (chosen, rejected, rationale))


def test_gradcheck_kto_float64():
    completion = torch.tensor([-1.0, -6.0, -2.0], dtype=torch.float64, requires_grad=True)

    def f(c):
        inputs = kto_inputs(
            [0.0] * 3,
            [-3.0, -4.0, -2.5],
            [-1.0, 0.0, -2.0],
            [-2.0, -3.0, -1.0],
            [True, False, True],
            dtype=torch.float64,
        )
        inputs.completion = c
        return kto(inputs)[0]

    assert torch.autograd.gradcheck(f, (completion,))
