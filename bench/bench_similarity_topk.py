"""Benchmark: fastpref.similarity_topk against ``torch.topk(q @ C.T, k)``, in one run.

Contenders (each returns the top ``K`` corpus rows of every query, float32):
  fastpref   ``fastpref.similarity_topk(q, C, K, backend="cpu")``: the C++ kernel through the
             public op (oneDNN tiles of 512 queries x 256 corpus rows, a running top k per row).
  torch      ``torch.topk(q @ C.T, K, dim=1)``: the B x M score matrix, then its top k.

Time: best of ``ROUNDS`` after a warm-up, the contenders timed round-robin in the same process
so machine noise hits them alike; the ratio is taken within the run.
Peak memory: each contender once more in a fresh process (``python bench_similarity_topk.py
--memory ...``, glibc's mmap threshold fixed at 128 KiB so freed buffers leave the resident set):
after a warm-up call the high-water mark is reset (``echo 5 > /proc/self/clear_refs``), one call
runs, and ``VmHWM - VmRSS(before)`` is the extra resident memory it needed (the [B, K] outputs
included, for both). It is compared with the B x M float32 score matrix torch allocates.

Cases: B x M x D = 4096 x 262144 x 384 (the score matrix is 4 GiB; 0.82 TFLOP of GEMM) and
4096 x 32768 x 384 (512 MiB), K = 100, float32 Gaussian inputs.

Run: ``flock /tmp/fastpref-bench.lock pytest bench/bench_similarity_topk.py -q -s`` (the table is
printed and written to ``bench/results/similarity_topk.md``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastpref

QUICK = os.environ.get("FASTPREF_BENCH_QUICK", "0") not in ("", "0")
K = 10 if QUICK else 100
CASES = {"quick": (256, 4096, 64)} if QUICK else {
    "M=32768": (4096, 32768, 384),
    "M=262144": (4096, 262144, 384),
}  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results" / "similarity_topk.md"
CONTENDERS = ("fastpref", "torch")


def make_inputs(B: int, M: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(M, D, generator=g)


def contender(name: str, q: torch.Tensor, c: torch.Tensor):
    if name == "fastpref":
        return lambda: tuple(fastpref.similarity_topk(q, c, K, backend="cpu"))
    return lambda: tuple(torch.topk(q @ c.T, K, dim=1))


def _rounds(M: int) -> int:
    return 1 if QUICK else (2 if M > 100_000 else 3)  # the large case: ~10 s a round


def _time_round_robin(q, c) -> tuple[dict[str, float], float]:
    runs = {name: contender(name, q, c) for name in CONTENDERS}
    out = {name: run() for name, run in runs.items()}  # warm-up
    # the same top k up to near-ties: compare the k-th scores (indices may swap on 1-ulp ties)
    diff = (out["fastpref"][0] - out["torch"][0]).abs().max().item()
    best = {name: float("inf") for name in CONTENDERS}
    for _ in range(_rounds(c.shape[0])):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, diff


def _memory(case: str, name: str) -> float:
    cmd = [sys.executable, __file__, "--memory", case, name]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


_table: dict[str, dict[str, object]] = {}


@pytest.mark.parametrize("case", list(CASES))
def test_similarity_topk(benchmark, case):
    B, M, D = CASES[case]
    q, c = make_inputs(B, M, D)
    times, diff = _time_round_robin(q, c)
    assert diff < 1e-3, f"fastpref and torch disagree on the top-k scores by {diff}"
    mem = {name: _memory(case, name) for name in CONTENDERS}
    benchmark.pedantic(contender("fastpref", q, c), rounds=1, iterations=1, warmup_rounds=0)
    scores_mb = B * M * 4 / 2**20
    row = dict(times=times, mem=mem, scores_mb=scores_mb, max_score_diff=diff,
               gflop=2 * B * M * D / 1e9, load=os.getloadavg()[0])  # fmt: skip
    benchmark.extra_info.update(row)
    _table[case] = row
    _write_table()


def _write_table() -> None:
    lines = [
        f"Machine: {_cpu_name()} (cpu family {_cpu_family()}), {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, fp32 GEMMs of the kernel in "
        f"{fastpref.ops._native._C.cpu_fp32_gemm()}; K = {K}.",
        "",
        "| B x M x D | fastpref s | torch s | fastpref/torch | fastpref GFLOP/s | "
        "extra MiB fastpref / torch | fastpref extra / score matrix | load (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, row in _table.items():
        B, M, D = CASES[case]
        tm, mem = row["times"], row["mem"]
        lines.append(
            f"| {B} x {M} x {D} | {tm['fastpref']:.2f} | {tm['torch']:.2f} | "
            f"{tm['fastpref'] / tm['torch']:.2f}x | {row['gflop'] / tm['fastpref']:.0f} | "
            f"{mem['fastpref']:.0f} / {mem['torch']:.0f} | "
            f"{100 * mem['fastpref'] / row['scores_mb']:.2f}% of {row['scores_mb']:.0f} MiB | "
            f"{row['load']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


def _cpuinfo(key: str) -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _cpu_name() -> str:
    return _cpuinfo("model name")


def _cpu_family() -> str:
    return _cpuinfo("cpu family")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _memory_worker(case: str, name: str) -> None:
    q, c = make_inputs(*CASES[case])
    run = contender(name, q, c)
    out = run()  # warm-up: oneDNN primitives, first touch of buffers
    del out
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    out = run()
    extra_mb = (_status_kb("VmHWM") - before) / 1024
    outputs_mb = sum(t.numel() * t.element_size() for t in out) / 2**20  # [B, K] x 2, in extra
    print(json.dumps({"extra_mb": extra_mb, "outputs_mb": outputs_mb}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--memory":
        _memory_worker(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --memory CASE CONTENDER")
