"""AEPO subset selection: pick k of N responses that are representative and diverse.

Annotation-Efficient Preference Optimization (AEPO; Jinnai et al., arXiv 2405.13541) scores only
a subset X of k of the N responses to an instruction with the reward model. With the N×N cosine
similarity matrix M of the responses' sentence embeddings, its diagonal set to 0, and
X ∈ {0, 1}^N with |X| = k, the subset maximises

    f(X) = 1ᵀ M X / ((N − 1) k)  −  λ · Xᵀ M X / (k (k − 1))

- the first term is the mean, over the selected j, of j's mean similarity to the other N − 1
  responses (representativeness: the MBR utility of j);
- the second is λ times the mean similarity of the k(k − 1) ordered pairs inside X (the
  diversity penalty; λ is ``--diversity-penalty``, default 1.0 as in the paper's code).

It equals ``u[X].sum() / ((N-1)*k) - lam * M[X][:, X].sum() / (k*(k-1))`` with
``u = M.sum(0)`` (:func:`objective`). :func:`select_subset` maximises it by greedy
construction (add the element with the largest gain, the normalisers using the final k, as the
paper does), started from each of the N responses in turn, each result followed by 1-swap local
search (best improving swap of one selected for one unselected response, until none improves: a
local optimum), and from ``restarts`` random starts drawn with ``seed``; the best wins.
:func:`select_exact` enumerates every subset when C(N, k) ≤ 10⁵.

Where this differs from the authors' code (``aepo`` 0.1.6), on purpose:

- the prompt column is never a candidate (their ``k != "prompt" or k != "instruction"`` is
  always true, so the prompt joined the responses and is the rejected response of every row of
  their shipped ``output_example.csv``); the column rule lives in :mod:`fastpref.data.aepo_io`;
- the diagonal is 0 in every evaluation (theirs copies the matrix before zeroing it, so the
  first greedy round sees a diagonal of 1 and penalises index 0, and the caller's matrix is
  zeroed in place);
- k = 1 and k > N are errors (theirs divides by k − 1 = 0 and then always picks the last
  index);
- the local search is deterministic (best improvement, ties to the lowest index; random starts
  only from ``seed``) and runs to a local optimum, not for 20 unseeded random swaps;
- each response is embedded once per instruction, not 2N times, and on the model's device;
  reward-model calls are batched, not one per response;
- no similarity-matrix cache (theirs is keyed by instruction index only, so it goes stale when N
  or the measure changes, and is text despite its ``.npy`` name);
- a file with fewer rows than ``--num-instructions`` uses the rows it has (theirs raises an
  IndexError). Their other slips (the ``compute_similatiy`` NameError, the Eurus template's
  ``[\\INST]``, an unconditional ``llm_blender`` import) have no counterpart here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastpref.errors import ConfigError

__all__ = [
    "DEFAULT_DIVERSITY_PENALTY",
    "DEFAULT_RESTARTS",
    "EXACT_LIMIT",
    "Selection",
    "check_subset_size",
    "objective",
    "select_exact",
    "select_subset",
    "similarity_matrix",
]

DEFAULT_DIVERSITY_PENALTY = 1.0
"""λ of the paper's code (``--diversity_penalty 1.0``)."""

DEFAULT_RESTARTS = 8
"""Random local-search starts beside the N greedy ones (cheap: O(k·N) per swap)."""

EXACT_LIMIT = 100_000
"""Largest C(N, k) that :func:`select_exact` enumerates."""

_TOL = 1e-12  # a swap must improve f by more than this (rounding must not loop forever)


@dataclass(frozen=True)
class Selection:
    """The chosen subset (indices in increasing order) and its objective value."""

    indices: tuple[int, ...]
    value: float


def check_subset_size(n: int, k: int) -> None:
    """Raise :class:`ConfigError` unless 2 ≤ k ≤ N (k = 1 has no pair to compare and makes the
    diversity term's k(k − 1) zero)."""
    if k < 2:
        raise ConfigError(
            f"--num-annotations must be at least 2, got {k}: one annotated response makes no "
            "preference pair, and the diversity term averages over k(k-1) pairs"
        )
    if k > n:
        raise ConfigError(
            f"--num-annotations {k} is more than --num-responses {n}: cannot pick {k} of {n}"
        )


def similarity_matrix(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarities ``[N, N]`` (float64) of the rows of ``embeddings``, diagonal 0."""
    e = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.where(norms > 0, norms, 1.0)
    sim = e @ e.T
    np.fill_diagonal(sim, 0.0)
    return sim


def _check_matrix(sim: np.ndarray) -> np.ndarray:
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"the similarity matrix must be square, got shape {sim.shape}")
    if np.any(np.diag(sim) != 0):
        raise ValueError("the similarity matrix must have a zero diagonal (see similarity_matrix)")
    return sim


def _weights(n: int, k: int, lam: float) -> tuple[float, float]:
    """(a, b) of f(X) = a·1ᵀMX − b·XᵀMX."""
    return 1.0 / ((n - 1) * k), lam / (k * (k - 1))


def objective(
    sim: np.ndarray, subset: Sequence[int], lam: float = DEFAULT_DIVERSITY_PENALTY
) -> float:
    """f(X) of the module docstring for the subset ``subset`` (k = its size ≥ 2)."""
    sim = _check_matrix(sim)
    idx = np.asarray(sorted(subset), dtype=np.int64)
    n, k = sim.shape[0], len(idx)
    check_subset_size(n, k)
    if len(set(idx.tolist())) != k:
        raise ValueError(f"subset has repeated indices: {list(subset)}")
    a, b = _weights(n, k, lam)
    return float(a * sim[:, idx].sum() - b * sim[np.ix_(idx, idx)].sum())


def _greedy_starts(sim: np.ndarray, u: np.ndarray, k: int, a: float, b: float) -> np.ndarray:
    """``[N, k]``: row j is the greedy subset whose first element is j (every start at once).

    Each later element has the largest gain a·u_t − 2b·Σ_{i∈S} M_it (ties: the lowest index).
    The paper's greedy, whose first element is argmax u, is one of the rows."""
    n = sim.shape[0]
    rows = np.arange(n)
    picks = np.empty((n, k), dtype=np.int64)
    picks[:, 0] = rows
    free = np.ones((n, n), dtype=bool)
    free[rows, rows] = False
    inside = sim.copy()  # [start, t] = Σ_{i∈S_start} M_it
    for step in range(1, k):
        gain = np.where(free, a * u[None, :] - 2 * b * inside, -np.inf)
        t = gain.argmax(1)
        picks[:, step] = t
        free[rows, t] = False
        inside += sim[t]
    return picks


def _local_search(
    sim: np.ndarray, u: np.ndarray, start: Sequence[int], a: float, b: float
) -> list[int]:
    """Best-improvement 1-swap ascent from ``start`` to a local optimum."""
    n = sim.shape[0]
    chosen = np.zeros(n, dtype=bool)
    chosen[list(start)] = True
    for _ in range(n * n * len(start) + 1):  # f rises every round, so this bound is never hit
        sel = np.flatnonzero(chosen)
        out = np.flatnonzero(~chosen)
        if out.size == 0:
            break
        inside = sim[sel].sum(0)  # Σ_{i∈S} M_ij  [N]
        # f(S − s + t) − f(S) = a(u_t − u_s) − 2b(inside_t − M_st − inside_s)   [k, N − k]
        delta = a * (u[out][None, :] - u[sel][:, None]) - 2 * b * (
            inside[out][None, :] - sim[np.ix_(sel, out)] - inside[sel][:, None]
        )
        best = int(np.argmax(delta))
        if delta.flat[best] <= _TOL:
            break
        s, t = divmod(best, out.size)
        chosen[sel[s]], chosen[out[t]] = False, True
    return np.flatnonzero(chosen).tolist()


def select_subset(
    sim: np.ndarray,
    k: int,
    lam: float = DEFAULT_DIVERSITY_PENALTY,
    *,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = 0,
) -> Selection:
    """Greedy construction + 1-swap local search for max f(X), |X| = k (module docstring).

    The greedy runs from each of the N responses as the first element (the paper's single greedy
    is one of them); each distinct result is improved by 1-swap local search to a local
    optimum. ``restarts`` extra local searches start from random k-subsets drawn from
    ``numpy.random.default_rng(seed)``. The best local optimum wins (ties: the first found).
    Deterministic for a given ``sim``, ``k``, ``lam``, ``restarts`` and ``seed``.
    """
    sim = _check_matrix(sim)
    n = sim.shape[0]
    check_subset_size(n, k)
    a, b = _weights(n, k, lam)
    u = sim.sum(0)
    starts = np.unique(np.sort(_greedy_starts(sim, u, k, a, b), axis=1), axis=0).tolist()
    rng = np.random.default_rng(seed)
    starts += [sorted(rng.choice(n, size=k, replace=False).tolist()) for _ in range(restarts)]
    best: Selection | None = None
    for start in starts:
        idx = _local_search(sim, u, start, a, b)
        value = objective(sim, idx, lam)
        if best is None or value > best.value + _TOL:
            best = Selection(tuple(idx), value)
    assert best is not None
    return best


def select_exact(
    sim: np.ndarray, k: int, lam: float = DEFAULT_DIVERSITY_PENALTY, *, limit: int = EXACT_LIMIT
) -> Selection:
    """The exact max f(X) over all C(N, k) subsets (ties: the lexicographically first).

    Raises :class:`ConfigError` when C(N, k) > ``limit`` (default 10⁵)."""
    sim = _check_matrix(sim)
    n = sim.shape[0]
    check_subset_size(n, k)
    count = math.comb(n, k)
    if count > limit:
        raise ConfigError(
            f"--exact enumerates C({n}, {k}) = {count} subsets, more than the limit of {limit}; "
            "use the default greedy + local search"
        )
    a, b = _weights(n, k, lam)
    u = sim.sum(0)
    combos = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)  # [C, k]
    values = a * u[combos].sum(1)
    for p, q in itertools.combinations(range(k), 2):
        values -= 2 * b * sim[combos[:, p], combos[:, q]]
    best = int(np.argmax(values))
    return Selection(tuple(combos[best].tolist()), objective(sim, combos[best], lam))
