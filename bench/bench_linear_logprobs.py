"""Benchmark: fused linear log-probs forward+backward against the alternatives, in one run.

Contenders (each does forward + backward for a random upstream gradient):
  fastpref   ``fastpref.linear_logprobs(..., backend="cpu")``: the C++ kernel through the public
             op (compaction, autograd and scatter included).
  eager      ``(h @ W.T).float().log_softmax(-1).gather(...)`` over every row, ignored or not, as
             trainers write it.
  compiled   ``torch.compile`` of the chunked PyTorch backend (fwd and bwd, on the kept rows).
  floor      the four GEMMs of a recomputing design with ``torch.mm`` on the kept rows: logits,
             recomputed logits, dH = G @ W, dW = G.T @ H (ATen's GEMMs: MKL for fp32, oneDNN
             for bf16; the kernel runs fp32 in oneDNN too, see bench/README.md).

Time: best of ``ROUNDS`` after a warm-up, all contenders of a case timed round-robin in the same
process so machine noise hits them alike; ratios are taken within the run.
Peak memory: each contender once more in a fresh process (``python bench_linear_logprobs.py
--memory ...``): after a warm-up call the kernel's high-water mark is reset (``echo 5 >
/proc/self/clear_refs``), one fwd+bwd runs, and ``VmHWM - VmRSS(before)`` is the extra resident
memory it needed. ``working`` subtracts the gradients every contender must return (dH + dW).

Run: ``flock /tmp/fastpref-bench.lock pytest bench/bench_linear_logprobs.py -q -s`` (the table is
printed and written to ``bench/results/linear_logprobs.md``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastpref
from fastpref.ops._linear_logprobs_chunked import chunked_bwd, chunked_fwd

QUICK = os.environ.get("FASTPREF_BENCH_QUICK", "0") not in ("", "0")
ROUNDS = 1 if QUICK else 3
RESULTS = Path(__file__).resolve().parent / "results" / "linear_logprobs.md"


@dataclass(frozen=True)
class Case:
    name: str
    N: int
    D: int
    V: int
    dtype: str
    ignored: float  # fraction of rows whose target is ignore_index
    logit_std: float = 1.0


def _cases() -> list[Case]:
    if QUICK:
        return [Case("quick", 64, 32, 1000, "float32", 0.5)]
    out = []
    for dt in ("float32", "bfloat16"):
        out += [
            Case(f"half-ignored {dt}", 2048, 512, 32000, dt, 0.5),
            Case(f"half-ignored wide {dt}", 2048, 512, 32000, dt, 0.5, logit_std=20.0),
            Case(f"none-ignored V=128256 {dt}", 1024, 512, 128256, dt, 0.0),
        ]
    return out


CASES = _cases()
CONTENDERS = ("fastpref", "eager", "compiled", "floor")


def make_inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    # logits z = h . w have standard deviation ~ logit_std
    h = (torch.randn(case.N, case.D, generator=g) * case.logit_std).to(dtype)
    w = (torch.randn(case.V, case.D, generator=g) / case.D**0.5).to(dtype)
    t = torch.randint(0, case.V, (case.N,), generator=g)
    t[torch.rand(case.N, generator=g) < case.ignored] = -100
    up = torch.randn(case.N, generator=g)
    return h, w, t, up


_compiled_fwd = torch.compile(chunked_fwd, dynamic=False)
_compiled_bwd = torch.compile(chunked_bwd, dynamic=False)


def contender(name: str, h, w, t, up):
    """A zero-argument callable doing one forward + backward."""
    keep = t != -100
    if name == "fastpref":
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

        def run():
            logp = fastpref.linear_logprobs(hh, ww, t, backend="cpu")
            return torch.autograd.grad((logp * up).sum(), (hh, ww))

    elif name == "eager":
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

        def run():
            logits = (hh @ ww.T).float()  # [N, V] for every row, as trainers do
            logp = logits.log_softmax(-1).gather(-1, t.clamp(min=0)[:, None])[:, 0]
            logp = torch.where(keep, logp, 0.0)
            return torch.autograd.grad((logp * up).sum(), (hh, ww))

    elif name == "compiled":

        def run():
            rows = keep.nonzero()[:, 0]
            hk, tk = h[rows], t[rows]
            _, lse, _ = _compiled_fwd(hk, w, tk, None, 1.0, None, False)
            dh, dw, _ = _compiled_bwd(
                up[rows], None, hk, w, tk, None, lse, None, 1.0, None, True, True, False
            )
            return h.new_zeros(h.shape).index_copy_(0, rows, dh), dw

    elif name == "floor":

        def run():
            hk = h[keep]
            z = hk @ w.T
            z = hk @ w.T  # the recompute
            return z @ w, z.T @ hk

    else:
        raise ValueError(name)
    return run


def _time_round_robin(case: Case) -> dict[str, float]:
    h, w, t, up = make_inputs(case)
    runs = {name: contender(name, h, w, t, up) for name in CONTENDERS}
    for run in runs.values():  # warm-up (and torch.compile)
        run()
    best = {name: float("inf") for name in CONTENDERS}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _memory(case: Case, name: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory", json.dumps(case.__dict__), name]
    # fixed mmap threshold: every buffer above 128 KiB is returned to the kernel when freed, so
    # the warm-up's freed buffers cannot hide the measured call's peak
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


_table: dict[str, dict[str, object]] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_linear_logprobs(benchmark, case):
    times = _time_round_robin(case)
    mem = {name: _memory(case, name) for name in CONTENDERS}
    h, w, t, up = make_inputs(case)
    run = contender("fastpref", h, w, t, up)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    logits_mb = case.N * case.V * 4 / 2**20
    benchmark.extra_info.update(times=times, memory=mem, logits_mb=logits_mb)
    _table[case.name] = dict(case=case, times=times, mem=mem, logits_mb=logits_mb)
    _write_table()


def _write_table() -> None:
    from torch import __version__ as torch_version

    lines = [
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch_version}, "
        f"{torch.get_num_threads()} threads; load average at the end "
        f"{os.getloadavg()[0]:.1f}.",
        "",
        "| case | fastpref s | eager s | compiled s | 4-GEMM floor s | fastpref/floor | "
        "eager/fastpref | compiled/fastpref | extra MiB fastpref / eager / compiled | "
        "fastpref extra / logits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in _table.items():
        tm, mem = row["times"], row["mem"]
        work = {k: v["working_mb"] for k, v in mem.items()}
        lines.append(
            f"| {name} | {tm['fastpref']:.3f} | {tm['eager']:.3f} | {tm['compiled']:.3f} | "
            f"{tm['floor']:.3f} | {tm['fastpref'] / tm['floor']:.2f}x | "
            f"{tm['eager'] / tm['fastpref']:.2f}x | {tm['compiled'] / tm['fastpref']:.2f}x | "
            f"{work['fastpref']:.0f} / {work['eager']:.0f} / {work['compiled']:.0f} | "
            f"{100 * work['fastpref'] / row['logits_mb']:.1f}% of {row['logits_mb']:.0f} MiB |"
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _memory_worker(case_json: str, name: str) -> None:
    case = Case(**json.loads(case_json))
    h, w, t, up = make_inputs(case)
    run = contender(name, h, w, t, up)
    grads = run()  # warm-up: compiles, creates oneDNN primitives, first-touch of buffers
    del grads
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    grads = run()
    extra_mb = (_status_kb("VmHWM") - before) / 1024
    grads_mb = sum(g.numel() * g.element_size() for g in grads) / 2**20
    print(json.dumps({"extra_mb": extra_mb, "working_mb": extra_mb - grads_mb}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--memory":
        _memory_worker(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --memory CASE_JSON CONTENDER")
