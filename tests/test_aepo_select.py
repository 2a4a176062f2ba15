"""AEPO's subset objective and its maximisers (fastpref.data.aepo), on hand-made matrices.

Small N (4 to 12) so that every subset can be enumerated and the heuristic checked against it.
"""

import itertools

import numpy as np
import pytest

from fastpref.data.aepo import (
    DEFAULT_RESTARTS,
    objective,
    select_exact,
    select_subset,
    similarity_matrix,
)
from fastpref.errors import ConfigError

# Four responses; M is symmetric with a zero diagonal. Column sums u = [1.4, 1.5, 1.2, 0.9].
M4 = np.array(
    [
        [0.0, 0.8, 0.2, 0.4],
        [0.8, 0.0, 0.6, 0.1],
        [0.2, 0.6, 0.0, 0.4],
        [0.4, 0.1, 0.4, 0.0],
    ]
)


def test_objective_hand_value_on_four_responses():
    """f(X) = 1ᵀMX / ((N−1)k) − λ XᵀMX / (k(k−1)), N = 4.

    k = 2, λ = 1: a = 1/(3·2) = 1/6, b = 1/(2·1) = 1/2.
      {1, 3}: (u1 + u3)/6 − (M13 + M31)/2 = 2.4/6 − 0.1 = 0.3          (the optimum)
      {0, 1}: (1.4 + 1.5)/6 − 1.6/2 = 0.48333 − 0.8 = −0.316667
      {0, 2}: 2.6/6 − 0.2 = 0.233333; {0, 3}: 2.3/6 − 0.4 = −0.016667
      {1, 2}: 2.7/6 − 0.6 = −0.15;     {2, 3}: 2.1/6 − 0.4 = −0.05
    k = 2, λ = 0.5: {0, 1}: 0.48333 − 0.5·0.8 = 0.083333.
    k = 3, λ = 1: a = 1/9, b = 1/6; {0, 2, 3}: (1.4 + 1.2 + 0.9)/9 − 2(0.2 + 0.4 + 0.4)/6
      = 0.388889 − 0.333333 = 1/18.
    """
    expected = {(1, 3): 0.3, (0, 1): -0.316667, (0, 2): 0.233333, (0, 3): -0.016667}
    expected |= {(1, 2): -0.15, (2, 3): -0.05}
    for subset, value in expected.items():
        assert objective(M4, subset, 1.0) == pytest.approx(value, abs=1e-6)
    assert objective(M4, (0, 1), 0.5) == pytest.approx(0.083333, abs=1e-6)
    assert objective(M4, (0, 2, 3), 1.0) == pytest.approx(1 / 18, abs=1e-12)
    assert select_exact(M4, 2).indices == (1, 3)
    assert select_subset(M4, 2).indices == (1, 3)
    assert select_subset(M4, 2).value == pytest.approx(0.3)


def test_similarity_matrix_is_cosine_with_zero_diagonal():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 5))
    sim = similarity_matrix(e * rng.uniform(0.5, 3, size=(6, 1)))  # scale does not matter
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    expected = unit @ unit.T
    np.fill_diagonal(expected, 0)
    np.testing.assert_allclose(sim, expected, atol=1e-12)
    assert np.all(np.diag(sim) == 0)
    before = sim.copy()
    select_subset(sim, 3)
    select_exact(sim, 3)
    np.testing.assert_array_equal(sim, before)  # the caller's matrix is never touched
    with_diag = sim.copy()
    np.fill_diagonal(with_diag, 1.0)  # the seed's first-round bug: the diagonal counted
    with pytest.raises(ValueError, match="zero diagonal"):
        objective(with_diag, (0, 1))


@pytest.mark.parametrize("k", [1, 0])
def test_k_below_two_is_an_error(k):
    with pytest.raises(ConfigError, match="at least 2"):
        select_subset(M4, k)
    with pytest.raises(ConfigError, match="at least 2"):
        select_exact(M4, k)


def test_k_above_n_is_an_error():
    with pytest.raises(ConfigError, match="more than --num-responses 4"):
        select_subset(M4, 5)
    with pytest.raises(ConfigError, match="more than"):
        objective(M4, (0, 1, 2, 3, 3))


def test_exact_refuses_too_many_subsets():
    sim = similarity_matrix(np.random.default_rng(0).normal(size=(40, 8)))
    with pytest.raises(ConfigError, match="C\\(40, 10\\)"):
        select_exact(sim, 10)


def _case(rng):
    n = int(rng.integers(5, 13))
    k = int(rng.integers(2, min(6, n) + 1))
    lam = float(rng.choice([0.5, 1.0, 2.0]))
    return similarity_matrix(rng.normal(size=(n, 16))), k, lam


def test_exact_agrees_with_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(40):
        sim, k, lam = _case(rng)
        brute = max(
            itertools.combinations(range(len(sim)), k), key=lambda s: objective(sim, s, lam)
        )
        got = select_exact(sim, k, lam)
        assert got.value == pytest.approx(objective(sim, brute, lam), abs=1e-12)
        assert got.indices == brute  # both take the lexicographically first of ties


def test_local_search_ends_at_a_one_swap_optimum():
    rng = np.random.default_rng(2)
    for _ in range(30):
        sim, k, lam = _case(rng)
        got = select_subset(sim, k, lam, restarts=0)
        inside = set(got.indices)
        for s in inside:
            for t in set(range(len(sim))) - inside:
                assert objective(sim, sorted(inside - {s} | {t}), lam) <= got.value + 1e-12


def test_greedy_and_local_search_reach_the_exact_optimum_on_most_cases(capsys):
    """200 random cases (N 5..12, k 2..6, λ ∈ {0.5, 1, 2}, Gaussian 16-d embeddings)."""
    rng = np.random.default_rng(3)
    hits = {"greedy from every start + local search": 0, "default": 0}
    for case in range(200):
        sim, k, lam = _case(rng)
        best = select_exact(sim, k, lam).value
        greedy = select_subset(sim, k, lam, restarts=0).value
        default = select_subset(sim, k, lam, seed=case).value
        assert greedy <= best + 1e-12 and default <= best + 1e-12
        hits["greedy from every start + local search"] += greedy >= best - 1e-9
        hits["default"] += default >= best - 1e-9
    with capsys.disabled():
        print(
            f"\nexact optimum reached on 200 cases: greedy + local search "
            f"{hits['greedy from every start + local search'] / 2:.1f}%, with the default "
            f"{DEFAULT_RESTARTS} random restarts {hits['default'] / 2:.1f}%"
        )
    assert hits["greedy from every start + local search"] >= 180
    assert hits["default"] >= 180


def test_without_diversity_penalty_the_top_k_representatives_win():
    """λ = 0 leaves f = Σ_{j∈X} u_j / ((N−1)k): the k largest column sums."""
    sim = similarity_matrix(np.random.default_rng(4).normal(size=(9, 4)))
    top = tuple(sorted(np.argsort(-sim.sum(0))[:3].tolist()))
    assert select_subset(sim, 3, 0.0, restarts=0).indices == top
    assert select_exact(sim, 3, 0.0).indices == top


def test_selection_is_deterministic_for_a_seed():
    sim = similarity_matrix(np.random.default_rng(5).normal(size=(30, 8)))
    runs = {select_subset(sim, 4, seed=7) for _ in range(3)}
    assert len(runs) == 1
    assert select_subset(sim, 30).indices == tuple(range(30))  # k = N: everything
