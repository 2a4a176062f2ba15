"""linear_logprobs' targets are range-checked once per call, and nothing below the check reads
out of bounds when it is skipped (issue 12: one authoritative check, not four).

Shapes are tiny (N=6, D=4, V=9): only the number of scans and the bad rows matter here.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastpref

L = importlib.import_module("fastpref.ops.linear_logprobs")  # the attribute is the function


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """The callers of every range scan (``check_labels``) made while the test runs."""
    calls: list[str] = []
    real = L.check_labels
    monkeypatch.setattr(L, "check_labels", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    return calls


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 4, generator=g, requires_grad=True)
    w = torch.randn(9, 4, generator=g, requires_grad=True)
    t = torch.randint(0, 9, (6,), generator=g)
    t[1] = -100
    return h, w, t


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
def test_one_scan_per_forward_and_backward(scans, backend):
    h, w, t = _inputs()
    fastpref.linear_logprobs(h, w, t, backend=backend).sum().backward()
    assert scans == ["linear_logprobs"]
    scans.clear()
    fastpref.sequence_logprobs(h.view(2, 3, 4), w, t.view(2, 3), backend=backend).sum().backward()
    assert scans == ["sequence_logprobs"]  # names labels[b, t]; the op trusts it
    scans.clear()
    q = torch.randn(3, 4, requires_grad=True)
    fastpref.infonce(q, torch.randn(6, 4), torch.tensor([0, 2, 5]), symmetric=True).sum().backward()
    assert scans == []  # infonce names positive_index[i] itself; its labels are in range


def test_compiled_sequence_logprobs_leaves_the_scan_to_the_op(scans):
    h, w, t = _inputs()
    fn = lambda h, w: fastpref.sequence_logprobs(h.view(2, 3, 4), w, t.view(2, 3)).sum()
    torch.compile(fn, fullgraph=True, backend="aot_eager")(h, w).backward()
    assert scans == ["linear_logprobs"]


def test_unchecked_raw_kernel_reads_nothing_for_a_bad_target():
    """check_targets=False (what fastpref.ops passes): a target outside [0, V) matches no tile
    column, so its row's logp is NaN and its gradient has no one-hot term; other rows are exact."""
    h, w, t = (x.detach() for x in _inputs())
    t[1] = 3
    bad = t.clone()
    bad[2] = 10**12  # far outside: no index arithmetic may overflow into range
    lp, lse, _, _ = torch.ops.fastpref_C.linear_logprobs_fwd(
        h, w, bad, None, 1.0, 0.0, False, False
    )
    want, want_lse, _, _ = torch.ops.fastpref_C.linear_logprobs_fwd(h, w, t, None, 1.0, 0.0, False)
    assert lp[2].isnan() and not lp[[0, 1, 3, 4, 5]].isnan().any()
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    torch.testing.assert_close(lp[[0, 1, 3, 4, 5]], want[[0, 1, 3, 4, 5]], rtol=0, atol=0)
    g = torch.ones(6)
    dh, _, _ = torch.ops.fastpref_C.linear_logprobs_bwd(
        g, None, h, w, bad, None, lse, None, 1.0, 0.0, True, False, False, False
    )
    p = (h @ w.T - lse[:, None]).exp()
    torch.testing.assert_close(dh[2], -(p[2] @ w), rtol=1e-5, atol=1e-6)  # no +w[target] term
