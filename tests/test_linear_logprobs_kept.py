"""linear_logprobs' three-GEMM path: the C++ kernel keeps the forward's logits for the backward.

When the kept rows' logits fit ``FASTPREF_LOGITS_BUDGET`` (default: 256 MiB) the backward reads them
instead of recomputing them. Both paths must agree with the reference to the tolerance of
test_linear_logprobs, and with each other bit for bit (the kept tiles are the outputs of the same
GEMMs the recompute runs); the budget decides which path runs; the variable is parsed strictly; the
trainer's adapter takes the path. Shapes: 37 rows (one padded row block), 600 fp32 rows (a full
512-row block, then a padded one), 1100 bf16 rows (a full 1024-row bf16 block, then a padded one); V
= 203 or 700 is not a multiple of the 256 / 512-column vocab tiles, so the last tile of the kept
layout is narrower.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastpref
from fastpref.errors import ConfigError
from fastpref.ops.linear_logprobs import (
    LOGITS_BUDGET_ENV,
    linear_entropy_reference,
    linear_logprobs_reference,
    logits_budget_for,
)

ops = importlib.import_module("fastpref.ops.linear_logprobs")  # the module, not the function
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}  # test_linear_logprobs'


def kept_rows(n: int, dtype: torch.dtype) -> int:
    """Rows of the C++ kernel's kept buffer: the last row block padded to 64."""
    block = 1024 if dtype == torch.bfloat16 else 512
    return n // block * block + -(-(n % block) // 64) * 64


def inputs(N, D, V, *, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    t[::ignore_every] = -100
    up = torch.randn(N, generator=g, dtype=torch.float64)
    return h, w, b, t, up


def fwd_bwd(h, w, b, t, up, dtype, *, backend="cpu", entropy=True, reference=False, **kw):
    """(logp, entropy, dH, dW, db) of sum(up * logp) + 0.3 sum(up * entropy) in ``dtype``."""
    x = [v.to(dtype).requires_grad_() for v in (h, w, b)]
    if reference:
        logp = linear_logprobs_reference(*x[:2], t, x[2], **kw)
        ent = linear_entropy_reference(*x[:2], t, x[2], **kw) if entropy else logp * 0
    else:
        logp = fastpref.linear_logprobs(*x[:2], t, x[2], backend=backend, **kw)
        ent = fastpref.linear_entropy(*x[:2], t, x[2], backend=backend, **kw) if entropy else 0
    u = up.to(logp.dtype)
    loss = (u * logp).sum() + 0.3 * (u * ent).sum()
    return [logp.detach(), torch.as_tensor(ent).detach(), *torch.autograd.grad(loss, x)]


@pytest.fixture
def spy(monkeypatch):
    """Records, per backward of the C++ kernel, whether it got kept logits."""
    calls: list[bool] = []
    fwd, bwd = ops._IMPLS["cpu"]

    def bwd_spy(*a):
        calls.append(a[-1] is not None)
        return bwd(*a)

    monkeypatch.setitem(ops._IMPLS, "cpu", (fwd, bwd_spy))
    return calls


@pytest.mark.parametrize(
    ("N", "V", "dtype"),
    [
        (37, 203, torch.float32),
        (600, 700, torch.float32),
        (1100, 700, torch.bfloat16),
        (37, 203, torch.bfloat16),
        (9, 203, torch.float64),
    ],
    ids=["odd-fp32", "two-blocks-fp32", "two-blocks-bf16", "odd-bf16", "fp64"],
)
def test_three_gemm_path_equals_the_recompute_and_the_reference(N, V, dtype, spy, monkeypatch):
    h, w, b, t, up = inputs(N, 24, V)
    kw = dict(temperature=0.7, softcap=4.0)
    monkeypatch.delenv(LOGITS_BUDGET_ENV, raising=False)
    kept = fwd_bwd(h, w, b, t, up, dtype, **kw)
    monkeypatch.setenv(LOGITS_BUDGET_ENV, "0")
    recomputed = fwd_bwd(h, w, b, t, up, dtype, **kw)
    assert spy == [True, True, False, False]  # logp and entropy calls; kept, then recomputed
    for name, x, y in zip(("logp", "entropy", "dH", "dW", "db"), kept, recomputed, strict=True):
        assert torch.equal(x, y), name  # the same GEMM tiles, kept or recomputed
    if dtype == torch.float64:  # its values: test_gradcheck_float64 (here the kernel is ~1e-8)
        return
    truth = fwd_bwd(h, w, b, t, up, torch.float64, reference=True, **kw)
    ref = fwd_bwd(h, w, b, t, up, dtype, reference=True, **kw)
    for name, x, r, tr in zip(("logp", "entropy", "dH", "dW", "db"), kept, ref, truth, strict=True):
        scale = max(tr.abs().max().item(), 1.0)
        err = (x.double() - tr).abs().max().item() / scale
        ref_err = (r.double() - tr).abs().max().item() / scale
        assert err <= ref_err + TOL[dtype], f"{name}: err {err:.3g} > ref {ref_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_budget_decides_the_path(dtype, spy, monkeypatch):
    """Kept exactly when rows x V x itemsize fits the budget; the saved buffer is that size."""
    N, V = 37, 203
    h, w, b, t, up = inputs(N, 24, V)
    need = kept_rows(int((t != -100).sum()), dtype) * V * torch.finfo(dtype).bits // 8
    saved = []
    for budget in (need, need - 1, 1, 0):
        monkeypatch.setenv(LOGITS_BUDGET_ENV, str(budget))
        with torch.autograd.graph.saved_tensors_hooks(
            lambda x: saved.append(x.numel()) or x, lambda x: x
        ):
            fwd_bwd(h, w, b, t, up, dtype, entropy=False)
    assert spy == [True, False, False, False]
    assert max(saved) == need // (torch.finfo(dtype).bits // 8)  # [rows * V], nothing larger


def test_the_backward_reads_the_kept_logits(monkeypatch):
    """Zeroing the kept buffer between forward and backward changes the gradients: the backward
    uses it and runs no GEMM of its own for the logits."""
    monkeypatch.delenv(LOGITS_BUDGET_ENV, raising=False)
    h, w, b, t, up = inputs(37, 24, 203)
    want = fwd_bwd(h, w, b, t, up, torch.float32, entropy=False)
    big = kept_rows(28, torch.float32) * 203  # 28 kept rows

    def unpack(x):
        return torch.zeros_like(x) if x.numel() == big else x

    with torch.autograd.graph.saved_tensors_hooks(lambda x: x, unpack):
        got = fwd_bwd(h, w, b, t, up, torch.float32, entropy=False)
    assert torch.equal(got[0], want[0])
    assert not torch.allclose(got[3], want[3])  # dW from logits all 0: a uniform softmax


def test_retain_graph_backward_twice_and_no_grad_keeps_nothing(monkeypatch):
    monkeypatch.delenv(LOGITS_BUDGET_ENV, raising=False)
    h, w, b, t, up = inputs(37, 24, 203)
    hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
    logp = fastpref.linear_logprobs(hh, ww, t, backend="cpu")
    first = torch.autograd.grad((logp * up.float()).sum(), (hh, ww), retain_graph=True)
    second = torch.autograd.grad((logp * up.float()).sum(), (hh, ww))
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: packed.append(x) or x, lambda x: x):
        with torch.no_grad():
            fastpref.linear_logprobs(hh, ww, t, backend="cpu")
    assert packed == []


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_other_backends_recompute(backend, monkeypatch):
    """The chunked (and Triton) kernels keep nothing whatever the budget: they recompute."""
    monkeypatch.setenv(LOGITS_BUDGET_ENV, str(2**30))
    h, w, b, t, up = inputs(37, 24, 203)
    got = fwd_bwd(h, w, b, t, up, torch.float32, backend=backend, entropy=False)
    monkeypatch.setenv(LOGITS_BUDGET_ENV, "0")
    want = fwd_bwd(h, w, b, t, up, torch.float32, backend=backend, entropy=False)
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))


def test_default_budget_and_env_parsing(monkeypatch):
    monkeypatch.delenv(LOGITS_BUDGET_ENV, raising=False)
    small, head = torch.empty(97, 32), torch.empty(128256, 256)
    for weight in (small, head, torch.empty(256000, 512).bfloat16()):
        assert logits_budget_for(weight) == 256 * 2**20  # whatever the head
    for raw, value in (("0", 0), (" 4096 ", 4096), ("", 256 * 2**20)):
        monkeypatch.setenv(LOGITS_BUDGET_ENV, raw)
        assert logits_budget_for(small) == value
    for junk in ("-1", "512MiB", "1e9", "lots", "1.5"):
        monkeypatch.setenv(LOGITS_BUDGET_ENV, junk)
        with pytest.raises(ConfigError, match=rf"FASTPREF_LOGITS_BUDGET='{junk}': expected a byte"):
            fastpref.linear_logprobs(
                small[:3].normal_().requires_grad_(), small, torch.tensor([0, 1, 2])
            )


def test_cpp_backward_rejects_a_foreign_buffer():
    h, w, b, t, up = (x.float() if x.is_floating_point() else x for x in inputs(8, 4, 30))
    t = t.clamp(min=0)
    lp, lse, _, kept = torch.ops.fastpref_C.linear_logprobs_fwd(
        h, w, t, None, 1.0, 0.0, False, True, 2**20
    )
    assert kept.numel() == 64 * 30
    with pytest.raises(RuntimeError, match=r"logits must be the forward's kept buffer"):
        torch.ops.fastpref_C.linear_logprobs_bwd(
            up, None, h, w, t, None, lse, None, 1.0, 0.0, True, True, False, True, kept[:-1]
        )


def test_the_trainers_adapter_takes_the_three_gemm_path(spy, monkeypatch):
    """PolicyLogps (what fastpref-train --loss dpo and the other lm_preference losses run) goes
    through run_logprobs, so its backward uses the kept logits when they fit the budget."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpref.models import PolicyLogps

    monkeypatch.delenv(LOGITS_BUDGET_ENV, raising=False)
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 97, (2, 9))
    labels = torch.full((2, 9), -100)
    labels[:, 4:-1] = ids[:, 5:]
    logps, _ = PolicyLogps(model)(ids, torch.ones_like(ids), labels)
    logps.sum().backward()
    assert spy == [True]
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_recycled_large_buffers_are_fully_rewritten(monkeypatch):
    """The kernel's large buffers (kept logits, dW) are recycled from call to call (a fresh one
    costs a page fault per page on first touch). A recycled block must never leak old values:
    two blocks are filled with NaN and handed back, and the next call, which takes them for its
    kept logits and its dW, must still match the recompute path and the reference. Sizes: N 60
    (a padded row block of 64 kept rows), D 64 and V 16400 make the kept [64 x V] and dW [V x 64]
    fp32 buffers 4.2 MB each, above the 4 MiB where the pool starts."""
    release = fastpref.ops.release_kernel_buffers
    release()
    monkeypatch.delenv(LOGITS_BUDGET_ENV, raising=False)
    N, D, V = 60, 64, 16400
    h, w, b, t, up = inputs(N, D, V, seed=3)
    h, w, t, up = h.float(), w.float(), t, up.float()

    def grads():
        x = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        logp = fastpref.linear_logprobs(*x, t, backend="cpu")
        return [logp.detach(), *torch.autograd.grad((up * logp).sum(), x)]

    held = [grads()[2], grads()[2]]  # two dW blocks alive at once: two distinct pool blocks
    assert all(d.data_ptr() % (2 << 20) == 0 for d in held)  # they are the pool's 2 MiB blocks
    for d in held:
        d.fill_(float("nan"))
    del d
    held.clear()  # both poisoned blocks back in the pool
    kept = grads()  # takes one for the kept logits, the other for dW
    monkeypatch.setenv(LOGITS_BUDGET_ENV, "0")
    recomputed = grads()
    ref = [linear_logprobs_reference(h.double(), w.double(), t)]
    x = [h.double().requires_grad_(), w.double().requires_grad_()]
    ref += torch.autograd.grad((up.double() * linear_logprobs_reference(*x, t)).sum(), x)
    for name, a, c, r in zip(("logp", "dH", "dW"), kept, recomputed, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, c), name
        scale = max(r.abs().max().item(), 1.0)
        assert (a.double() - r).abs().max().item() / scale <= TOL[torch.float32] * 10, name
    del kept, recomputed, a, c  # the loop's names hold the last (dW) tensors
    assert release() >= 2 * 4_194_304  # the freed blocks went back to the pool, and now out
    assert release() == 0
