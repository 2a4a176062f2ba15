"""InfoNCE forward+backward: fastpref.infonce vs the materialising reference (eager, compiled).

Run (the lock keeps benchmarks from overlapping on the shared machine):

    flock /tmp/fastpref-bench.lock pytest bench/bench_infonce.py --benchmark-json=/tmp/infonce.json

Shapes: B = 4096 queries, group_size G in {1, 8} (M = B·G passages: in-batch negatives only, or
one positive + 7 hard negatives per query), D in {384, 768}, float32, τ = 0.05, cosine.
Each timed step is ``infonce(q, p).mean().backward()``. Peak memory is measured in a fresh
subprocess per contender as the rise of the resident set during one step (VmHWM after resetting
it through /proc/self/clear_refs, minus VmRSS before the step; the compiled contender after one
warm-up step that compiles it): honest on the CPU, where allocator statistics do not exist.
``test_scale_beyond_reference`` runs fastpref at a size whose B×M logits do not fit in this
machine's memory and states what the reference needs (never allocating it: the machine is shared).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest
import torch

from fastpref.ops.infonce import infonce, infonce_reference

# FASTPREF_BENCH_QUICK=1 (bench/_common.py's convention): tiny shapes, to smoke-test this file.
QUICK = os.environ.get("FASTPREF_BENCH_QUICK", "0") not in ("", "0")
B = 256 if QUICK else 4096
TEMPERATURE = 0.05
SHAPES = [(384, 1), (384, 8), (768, 1), (768, 8)]  # (D, group_size)
# glibc: serve every allocation above 128 KiB with mmap and unmap it on free, so the resident set
# tracks live tensors (by default freed buffers of the warm-up step stay in the heap).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# The large run: B×M float32 logits alone are 16 GiB, the reference needs several such buffers.
# (32768 queries would double the ~13 TFLOP of a step on a CPU shared with other engineers.)
# Override with FASTPREF_BENCH_SCALE=B,M,D.
SCALE = tuple(int(x) for x in os.environ.get("FASTPREF_BENCH_SCALE", "16384,262144,384").split(","))
NEVER_ALLOCATE = 16 * 2**30  # do not attempt a reference run predicted above this


def _fastpref(q, p):
    return infonce(q, p, temperature=TEMPERATURE)


def _eager(q, p):
    return infonce_reference(q, p, temperature=TEMPERATURE)


_compiled = torch.compile(_eager, dynamic=False)
CONTENDERS = {"fastpref": _fastpref, "eager": _eager, "compiled": _compiled}


def _inputs(M: int, D: int, n_queries: int = B, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n_queries, D, generator=g).to(dtype).requires_grad_(True)
    p = torch.randn(M, D, generator=g).to(dtype).requires_grad_(True)
    return q, p


def _step(fn, q, p) -> None:
    q.grad = p.grad = None
    fn(q, p).mean().backward()


def _proc_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _probe(contender: str, n_queries: int, M: int, D: int, warmup: bool) -> dict:
    """One step in this process; its extra peak resident memory and its time."""
    torch.manual_seed(0)
    q, p = _inputs(M, D, n_queries)
    fn = CONTENDERS[contender]
    if warmup:
        _step(fn, q, p)
    q.grad = p.grad = None
    base = _proc_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak resident set) to the current RSS
    t0 = time.perf_counter()
    _step(fn, q, p)
    seconds = time.perf_counter() - t0
    return {"extra_peak_bytes": _proc_bytes("VmHWM") - base, "seconds": seconds}


def _probe_subprocess(contender: str, n_queries: int, M: int, D: int, warmup: bool):
    args = [sys.executable, __file__, contender, str(n_queries), str(M), str(D), str(int(warmup))]
    env = {**os.environ, **MALLOC_ENV}
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _hardware() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("D, group_size", SHAPES, ids=[f"D{d}-G{g}" for d, g in SHAPES])
def test_infonce_fwd_bwd(benchmark, D, group_size, contender):
    M = B * group_size
    q, p = _inputs(M, D)
    fn = CONTENDERS[contender]
    benchmark.group = f"infonce B={B} M={M} D={D} fp32 fwd+bwd"
    benchmark.extra_info.update(_hardware())
    # warm-up only where the first call differs (compilation); others show their first step
    mem = _probe_subprocess(contender, B, M, D, warmup=contender == "compiled")
    benchmark.extra_info["extra_peak_MiB"] = round(mem["extra_peak_bytes"] / 2**20, 1)
    benchmark.extra_info["logits_MiB"] = round(B * M * 4 / 2**20, 1)
    benchmark.pedantic(_step, args=(fn, q, p), rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("D, group_size", SHAPES, ids=[f"D{d}-G{g}" for d, g in SHAPES])
def test_infonce_vs_eager_interleaved(benchmark, D, group_size):
    """fastpref / eager time ratio from alternating steps (robust to load drifting between
    tests on a shared machine): the median of 5 pairs, in ``extra_info``."""
    M = B * group_size
    q, p = _inputs(M, D)
    times: dict[str, list[float]] = {"fastpref": [], "eager": []}

    def pair() -> None:
        for name in times:
            t0 = time.perf_counter()
            _step(CONTENDERS[name], q, p)
            times[name].append(time.perf_counter() - t0)

    benchmark.group = "infonce fastpref + eager, interleaved"
    benchmark.extra_info.update(_hardware())
    benchmark.pedantic(pair, rounds=5, warmup_rounds=1, iterations=1)
    median = {k: sorted(v[-5:])[2] for k, v in times.items()}
    benchmark.extra_info.update({f"{k}_median_s": round(v, 3) for k, v in median.items()})
    benchmark.extra_info["fastpref_over_eager"] = round(median["fastpref"] / median["eager"], 3)


def test_scale_beyond_reference(benchmark):
    """fastpref runs where the reference cannot: predicted reference need vs measured fastpref.

    The reference's need is extrapolated from its measured extra peak per B·M element at the
    largest benchmark shape (it is dominated by B×M float32 buffers: logits, log-softmax,
    their gradient), and bounded below by two live B×M float32 buffers.
    """
    if QUICK:
        pytest.skip("FASTPREF_BENCH_QUICK: the large-scale run is the point of this test")
    n_queries, M, D = SCALE
    total = _hardware()["mem_total_gib"] * 2**30
    small_B, small_M, small_D = B, B * 8, 768
    eager_small = _probe_subprocess("eager", small_B, small_M, small_D, warmup=False)
    per_element = eager_small["extra_peak_bytes"] / (small_B * small_M)
    predicted = per_element * n_queries * M
    lower_bound = 2 * 4 * n_queries * M
    info = benchmark.extra_info
    info.update(_hardware())
    info.update(
        {
            "shape": f"B={n_queries} M={M} D={D} fp32",
            "reference_bytes_per_BxM_element": round(per_element, 2),
            "reference_predicted_GiB": round(predicted / 2**30, 1),
            "reference_lower_bound_GiB": round(lower_bound / 2**30, 1),
        }
    )
    if max(predicted, lower_bound) < min(NEVER_ALLOCATE, total):
        pytest.fail(f"SCALE {SCALE} fits the reference ({predicted / 2**30:.1f} GiB): enlarge it")
    result = benchmark.pedantic(
        _probe_subprocess, args=("fastpref", n_queries, M, D, False), rounds=1, iterations=1
    )
    info["fastpref_extra_peak_MiB"] = round(result["extra_peak_bytes"] / 2**20, 1)
    info["fastpref_step_seconds"] = round(result["seconds"], 1)
    info["inputs_MiB"] = round((n_queries + M) * D * 4 / 2**20, 1)
    # O((B+M)·D): normalised copies, their gradients, the kernel's per-thread accumulators
    inputs = (n_queries + M) * D * 4
    assert result["extra_peak_bytes"] < min(8 * inputs, 0.1 * lower_bound)


if __name__ == "__main__":  # the subprocess side of _probe_subprocess
    name, n_q, n_p, dim, warm = sys.argv[1:]
    print(json.dumps(_probe(name, int(n_q), int(n_p), int(dim), bool(int(warm)))))
