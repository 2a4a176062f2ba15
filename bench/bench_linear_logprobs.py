"""Benchmark: fused linear log-probs forward+backward against the alternatives, in one run.

Contenders (each does forward + backward for a random upstream gradient):
  fastpref   ``fastpref.linear_logprobs(..., backend="cpu")``: the C++ kernel through the public
             op (compaction, autograd and scatter included), on its recomputing backward
             (``FASTPREF_LOGITS_BUDGET=0``: the memory column is the tiled design's; the
             three-GEMM path keeps the N x V logits and is timed by ``test_against_four_gemms``).
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

``test_against_four_gemms`` (issue 18): the op at the DPO step's shapes (1015 kept rows, D 256,
V 32000 and 128256, fp32 and bf16) on its two backward paths -- ``recompute``
(``FASTPREF_LOGITS_BUDGET=0``, four GEMMs) and ``three-GEMM`` (the default budget keeps the
logits) -- against the four GEMMs of its shapes, ``z = h @ W.T`` twice, ``G @ W`` and
``G.T @ h``, into outputs allocated once (the GEMM rate without page faults), in oneDNN
(``fastpref_C.cpu_mm``: the kernel's own GEMM call on whole matrices) and in ``torch.mm`` (for
fp32 that is MKL, not oneDNN, on this torch: the table names the library each one ran, from
``ONEDNN_VERBOSE``). Written to ``bench/results/linear_logprobs_gemms.md``.
Only that table: ``pytest bench/bench_linear_logprobs.py -k four_gemms -q -s``.
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
GEMM_RESULTS = RESULTS.with_name("linear_logprobs_gemms.md")


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


def _with_budget(budget: str | None, fn):
    def run():
        old = os.environ.get("FASTPREF_LOGITS_BUDGET")
        if budget is None:
            os.environ.pop("FASTPREF_LOGITS_BUDGET", None)
        else:
            os.environ["FASTPREF_LOGITS_BUDGET"] = budget
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("FASTPREF_LOGITS_BUDGET", None)
            else:
                os.environ["FASTPREF_LOGITS_BUDGET"] = old

    return run


def contender(name: str, h, w, t, up):
    """A zero-argument callable doing one forward + backward."""
    keep = t != -100
    if name == "fastpref":
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

        def recompute():
            logp = fastpref.linear_logprobs(hh, ww, t, backend="cpu")
            return torch.autograd.grad((logp * up).sum(), (hh, ww))

        run = _with_budget("0", recompute)

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


# --- the op against four GEMMs of its shapes (issue 18) -------------------------------------

GEMM_CASES = [
    Case(f"DPO step V={V} {dt}", 1015, 256, V, dt, 0.0)
    for dt in ("float32", "bfloat16")
    for V in (32000, 128256)
]
if QUICK:
    GEMM_CASES = [Case("quick", 100, 32, 3000, "float32", 0.0)]
GEMM_ROUNDS = 1 if QUICK else 5
GEMM_CONTENDERS = ("recompute", "three-GEMM", "4 oneDNN GEMMs", "4 torch.mm", "3 oneDNN GEMMs")


def gemm_contender(name: str, h, w, t, up):
    """A zero-argument callable: one fwd+bwd of the op, or the GEMMs of its shapes."""
    if name in ("recompute", "three-GEMM"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

        def op():
            logp = fastpref.linear_logprobs(hh, ww, t, backend="cpu")
            return torch.autograd.grad((logp * up).sum(), (hh, ww))

        return _with_budget("0" if name == "recompute" else None, op)
    if name == "4 torch.mm":
        mm = torch.mm
    else:

        def mm(a, b, *, out):
            torch.ops.fastpref_C.cpu_mm(a, b, out)

    # outputs allocated once: the GEMMs alone, without the page faults of fresh buffers
    z = h.new_empty(h.shape[0], w.shape[0])
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def gemms():
        mm(h, w.T, out=z)  # [N, V] logits
        if not name.startswith("3"):
            mm(h, w.T, out=z)  # the recompute
        mm(z, w, out=dh)  # dH = G @ W
        mm(z.T, h, out=dw)  # dW = G.T @ H
        return dh, dw

    return gemms


def _gemm_library(dtype: str) -> dict[str, str]:
    """Which library ran torch.mm and fastpref_C.cpu_mm in ``dtype``: oneDNN's verbose log says."""
    code = (
        "import torch, fastpref\n"
        f"a, b = torch.randn(64, 64).to(torch.{dtype}), torch.randn(64, 64).to(torch.{dtype})\n"
        "print('@mm', flush=True); torch.mm(a, b)\n"
        "print('@cpu_mm', flush=True); torch.ops.fastpref_C.cpu_mm(a, b, torch.empty_like(a))\n"
        "print('@end', flush=True)\n"
    )
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    ).stdout
    found = {}
    for name, part in zip(("mm", "cpu_mm"), out.split("@")[1:3], strict=True):
        impl = [ln.split(",")[6] for ln in part.splitlines() if ",exec,cpu,matmul," in ln]
        found[name] = f"oneDNN {impl[0]}" if impl else "not oneDNN (MKL: BLAS_INFO=mkl)"
    return found


_gemm_table: dict[str, dict[str, object]] = {}


@pytest.mark.parametrize("case", GEMM_CASES, ids=[c.name for c in GEMM_CASES])
def test_against_four_gemms(benchmark, case):
    h, w, t, up = make_inputs(case)
    runs = {name: gemm_contender(name, h, w, t, up) for name in GEMM_CONTENDERS}
    for run in runs.values():  # warm-up: oneDNN primitives, first touch of the buffers
        run()
    best = {name: float("inf") for name in GEMM_CONTENDERS}
    for _ in range(GEMM_ROUNDS):  # round-robin: machine noise hits every contender alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    benchmark.pedantic(runs["three-GEMM"], rounds=GEMM_ROUNDS, iterations=1, warmup_rounds=1)
    flop = 2 * case.N * case.D * case.V  # one GEMM
    row = dict(case=case, times=best, gflops=4 * flop / best["4 oneDNN GEMMs"] / 1e9)
    block = 1024 if case.dtype == "bfloat16" else 512  # the kernel's row block; last one padded
    rows = case.N // block * block + -(-(case.N % block) // 64) * 64
    row["kept_mib"] = rows * case.V * getattr(torch, case.dtype).itemsize / 2**20
    row["library"] = _gemm_library(case.dtype)
    benchmark.extra_info.update(times=best, library=row["library"])
    _gemm_table[case.name] = row
    _write_gemm_table()


def _write_gemm_table() -> None:
    from torch import __version__ as torch_version

    lines = [
        f"Machine: {_cpu_name()} (cpu family {_cpu_family()}), {os.cpu_count()} cores, torch "
        f"{torch_version}, {torch.get_num_threads()} threads, torch.backends.mkldnn available "
        f"{torch.backends.mkldnn.is_available()}; best of {GEMM_ROUNDS}, round-robin; load "
        f"average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| case | recompute s | three-GEMM s | 4 oneDNN GEMMs s (GFLOP/s) | 4 torch.mm s | "
        "3 oneDNN GEMMs s | recompute / 4 oneDNN | three-GEMM / 4 oneDNN | "
        "kept logits MiB | torch.mm library | cpu_mm library |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in _gemm_table.items():
        tm, lib = row["times"], row["library"]
        four = tm["4 oneDNN GEMMs"]
        lines.append(
            f"| {name} | {tm['recompute']:.3f} | {tm['three-GEMM']:.3f} | {four:.3f} "
            f"({row['gflops']:.0f}) | {tm['4 torch.mm']:.3f} | {tm['3 oneDNN GEMMs']:.3f} | "
            f"{tm['recompute'] / four:.2f}x | {tm['three-GEMM'] / four:.2f}x | "
            f"{row['kept_mib']:.0f} | {lib['mm']} | {lib['cpu_mm']} |"
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    GEMM_RESULTS.parent.mkdir(exist_ok=True)
    GEMM_RESULTS.write_text(text)


def _cpu_family() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu family"):
            return line.split(":", 1)[1].strip()
    return "unknown"


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
