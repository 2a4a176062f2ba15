"""Op level: policy and reference hidden states -> DPO loss, forward + backward (issue 7).

Contenders, on the same float32 inputs (P pairs = 2P sequences of T tokens, the first half of
each sequence prompt with label -100; hidden D; vocabulary V; beta = 0.1; the policy has
gradients in its hidden states and lm_head weight, the reference runs without gradients):

- ``fastpref``: ``fastpref.sequence_logprobs`` for the policy (with grad) and the reference
  (under ``no_grad``), then the ``dpo`` objective of ``fastpref.losses``.
- ``liger`` / ``liger_compiled``: ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss`` with
  ``compiled=False`` / ``True`` (pure PyTorch, chunked one pair at a time; the reference goes
  through the same call).
- ``eager``: plain PyTorch that materialises the [2P, T, V] logits and ``log_softmax`` of both.

Time: pytest-benchmark, in this process (``liger_compiled`` gets one warm-up round, in which it
compiles; the others none). Memory: every contender in a fresh subprocess (this file run as a
script): the peak resident set above the resident set just before one call (for
``liger_compiled`` the call after the compiling one), sampled every 0.5 ms by a thread, with
glibc's mmap threshold pinned so freed tensors leave the resident set; plus the worker's whole
peak (VmHWM). Agreement: loss and both gradients of every contender against ``eager``.

    flock /tmp/fastpref-bench.lock pytest bench/bench_dpo_loss.py
    FASTPREF_BENCH_QUICK=1 pytest bench/bench_dpo_loss.py     # tiny shapes, smoke test
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _common import (
    MALLOC_ENV,
    QUICK,
    RssPeak,
    hardware,
    loadavg,
    peak_rss_mb,
    python_worker,
    run_child,
)

BETA = 0.1
if QUICK:
    PAIRS, T, D, VOCABS = 2, 64, 32, (1000,)
else:
    PAIRS, T, D, VOCABS = 4, 512, 512, (32000, 128256)
PROMPT = T // 2
CONTENDERS = ("eager", "liger", "liger_compiled", "fastpref")
# Timed rounds per vocabulary (a 128k round of the slow contenders takes over a minute on 2
# busy cores). Only the compiled contender gets a warm-up round: its first call compiles.
ROUNDS = dict(zip(VOCABS, (3, 1), strict=False)) if not QUICK else {v: 2 for v in VOCABS}
WARMUP = {"eager": 0, "liger": 0, "liger_compiled": 1, "fastpref": 0}

# Tolerances against eager float32: the contenders sum the same float32 terms in another order
# (chunks, tiles), so the loss agrees to float32 rounding of a sum over ~2k tokens, and every
# gradient element to a small fraction of the largest one (Liger compiled, whose inductor
# log_softmax reduces 128k logits in another order, is 1.3e-4 of the max off eager at V=128256).
LOSS_ATOL = 1e-4
GRAD_RTOL_OF_MAX = 5e-4


@dataclass
class Inputs:
    hidden: torch.Tensor  # [2P, T, D] policy, chosen rows first, requires grad
    weight: torch.Tensor  # [V, D] policy lm_head, requires grad
    ref_hidden: torch.Tensor  # [2P, T, D]
    ref_weight: torch.Tensor  # [V, D]
    labels: torch.Tensor  # [2P, T], -100 on the prompt half


def make_inputs(vocab: int, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    n = 2 * PAIRS
    hidden = torch.randn(n, T, D, generator=g)
    weight = torch.randn(vocab, D, generator=g) * D**-0.5
    # The reference is the policy a few updates ago: close, not equal, so the loss is not ln 2.
    ref_hidden = hidden + 0.05 * torch.randn(n, T, D, generator=g)
    ref_weight = weight + 0.05 * D**-0.5 * torch.randn(vocab, D, generator=g)
    labels = torch.randint(0, vocab, (n, T), generator=g)
    labels[:, :PROMPT] = -100
    return Inputs(hidden.requires_grad_(), weight.requires_grad_(), ref_hidden, ref_weight, labels)


def _eager_seq_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    logits = hidden @ weight.T  # [2P, T, V], materialised
    logp = logits.float().log_softmax(-1)
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def run_eager(x: Inputs) -> torch.Tensor:
    pol = _eager_seq_logps(x.hidden, x.weight, x.labels)
    with torch.no_grad():
        ref = _eager_seq_logps(x.ref_hidden, x.ref_weight, x.labels)
    margin = (pol[:PAIRS] - ref[:PAIRS]) - (pol[PAIRS:] - ref[PAIRS:])
    loss = -F.logsigmoid(BETA * margin).mean()
    loss.backward()
    return loss.detach()


def _liger(compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    fn = LigerFusedLinearDPOLoss(
        beta=BETA, compiled=compiled, use_ref_model=True, average_log_prob=False
    )

    def run(x: Inputs) -> torch.Tensor:
        loss = fn(x.weight, x.hidden, x.labels, ref_input=x.ref_hidden, ref_weight=x.ref_weight)[0]
        loss.backward()
        return loss.detach()

    return run


def run_fastpref(x: Inputs) -> torch.Tensor:
    from fastpref import sequence_logprobs
    from fastpref.losses import PairLogps, dpo

    pol = sequence_logprobs(x.hidden, x.weight, x.labels)
    with torch.no_grad():
        ref = sequence_logprobs(x.ref_hidden, x.ref_weight, x.labels)
    tokens = (x.labels != -100).sum(-1).float()
    inputs = PairLogps(
        chosen=pol[:PAIRS],
        rejected=pol[PAIRS:],
        chosen_tokens=tokens[:PAIRS],
        rejected_tokens=tokens[PAIRS:],
        ref_chosen=ref[:PAIRS],
        ref_rejected=ref[PAIRS:],
    )
    loss, _ = dpo(inputs, beta=BETA)
    loss.backward()
    return loss.detach()


def contender(name: str):
    return {
        "eager": run_eager,
        "liger": _liger(compiled=False),
        "liger_compiled": _liger(compiled=True),
        "fastpref": run_fastpref,
    }[name]


def _zero_grads(x: Inputs) -> None:
    x.hidden.grad = None
    x.weight.grad = None


def _result(x: Inputs, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"loss": loss, "d_hidden": x.hidden.grad.clone(), "d_weight": x.weight.grad.clone()}


# -- pytest-benchmark ---------------------------------------------------------------------------


def _fastpref_ready() -> bool:
    try:
        from fastpref import sequence_logprobs  # noqa: F401
        from fastpref.losses import PairLogps, dpo  # noqa: F401
    except ImportError:
        return False
    return True


_INPUTS: dict[int, Inputs] = {}
_EAGER: dict[int, dict[str, torch.Tensor]] = {}


def _inputs(vocab: int) -> Inputs:
    if vocab not in _INPUTS:
        _INPUTS.clear()  # one vocabulary's inputs at a time (128k weights are 260 MB each)
        _EAGER.clear()
        _INPUTS[vocab] = make_inputs(vocab)
    return _INPUTS[vocab]


def _eager_result(vocab: int) -> dict[str, torch.Tensor]:
    if vocab not in _EAGER:
        x = _inputs(vocab)
        _zero_grads(x)
        _EAGER[vocab] = _result(x, run_eager(x))
        _zero_grads(x)
    return _EAGER[vocab]


def check_agreement(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    errs = {"loss_abs_err": (got["loss"] - want["loss"]).abs().item()}
    for k in ("d_hidden", "d_weight"):
        scale = want[k].abs().max().item()
        errs[f"{k}_max_err_over_max"] = (got[k] - want[k]).abs().max().item() / scale
    assert errs["loss_abs_err"] <= LOSS_ATOL, errs
    for k in ("d_hidden", "d_weight"):
        assert errs[f"{k}_max_err_over_max"] <= GRAD_RTOL_OF_MAX, errs
    return errs


def measure_memory(name: str, vocab: int) -> dict[str, float]:
    """Peak RSS above the pre-call baseline of one call, in a fresh process."""
    run = run_child(
        python_worker("bench_dpo_loss.py", "--memory", name, "--vocab", str(vocab)),
        env={**MALLOC_ENV, **({"FASTPREF_BENCH_QUICK": "1"} if QUICK else {})},
        timeout=3600,
    ).check()
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CONTENDERS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_dpo_loss(benchmark, name: str, vocab: int) -> None:
    if name == "fastpref" and not _fastpref_ready():
        pytest.skip("fastpref.sequence_logprobs or fastpref.losses.dpo has not landed yet")
    if name.startswith("liger"):
        pytest.importorskip("liger_kernel", reason="pip install -e '.[bench]'")
    x = _inputs(vocab)
    fn = contender(name)

    def setup():
        _zero_grads(x)
        return (x,), {}

    benchmark.group = f"dpo_loss V={vocab}"
    load_before = loadavg()
    loss = benchmark.pedantic(
        fn, setup=setup, rounds=ROUNDS[vocab], warmup_rounds=WARMUP[name], iterations=1
    )
    load_after = loadavg()
    got = _result(x, loss)
    if name == "eager":
        _EAGER[vocab] = got
    errs = check_agreement(got, _eager_result(vocab))
    del got
    _zero_grads(x)

    mem = measure_memory(name, vocab)
    benchmark.extra_info.update(
        contender=name,
        pairs=PAIRS,
        T=T,
        prompt_tokens=PROMPT,
        D=D,
        V=vocab,
        dtype="float32",
        loss=loss.item(),
        **errs,
        peak_rss_above_baseline_mb=mem["peak_above_mb"],
        worker_vmhwm_mb=mem["vmhwm_mb"],
        full_logits_mb=2 * PAIRS * T * vocab * 4 / 2**20,
        loadavg_before=load_before,
        loadavg_after=load_after,
        hardware=hardware(),
    )


# -- memory worker: python bench/bench_dpo_loss.py --memory NAME --vocab V --------------------


def _memory_worker(name: str, vocab: int) -> None:
    x = make_inputs(vocab)
    fn = contender(name)
    if WARMUP[name]:
        fn(x)  # compile first: the compiler's own memory is not the loss's
        _zero_grads(x)
    with RssPeak() as peak:
        loss = fn(x)
    print(
        json.dumps(
            {
                "name": name,
                "vocab": vocab,
                "loss": loss.item(),
                "peak_above_mb": peak.peak_above_start / 2**20,
                "baseline_mb": peak.start / 2**20,
                "vmhwm_mb": peak_rss_mb(),
            }
        )
    )


def table(paths: list[str]) -> str:
    """Markdown table from pytest-benchmark JSON files (``--benchmark-json``) of this file."""
    rows = {}
    for path in paths:
        with open(path) as f:
            for b in json.load(f)["benchmarks"]:
                e = b["extra_info"]
                if "V" not in e:  # a failed test records no extra info
                    continue
                rows[(e["V"], CONTENDERS.index(e["contender"]))] = (b["stats"], e)
    lines = [
        "| V | contender | min (s) | mean (s) | rounds | vs fastpref (min) | peak RSS above "
        "baseline (MB) | full logits (MB) | loss err | dH err/max | dW err/max |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (vocab, _), (st, e) in sorted(rows.items()):
        ours = rows.get((vocab, CONTENDERS.index("fastpref")))
        rel = f"{st['min'] / ours[0]['min']:.2f}x" if ours else "-"
        lines.append(
            f"| {vocab} | {e['contender']} | {st['min']:.2f} | {st['mean']:.2f} | {st['rounds']} | "
            f"{rel} | {e['peak_rss_above_baseline_mb']:.0f} | {e['full_logits_mb']:.0f} | "
            f"{e['loss_abs_err']:.1e} | {e['d_hidden_max_err_over_max']:.1e} | "
            f"{e['d_weight_max_err_over_max']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--memory", choices=CONTENDERS)
    p.add_argument("--vocab", type=int)
    p.add_argument("--table", nargs="+", metavar="BENCH_JSON")
    a = p.parse_args()
    if a.table:
        print(table(a.table))
    else:
        _memory_worker(a.memory, a.vocab)
