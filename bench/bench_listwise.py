"""listwise_loss forward+backward: fastpref C++ vs the materialising reference (eager, compiled).

Run (the lock keeps benchmarks from overlapping on the shared machine):

    flock /tmp/fastpref-bench.lock pytest bench/bench_listwise.py -p no:cacheprovider -s

Shapes: (B, K) = (4096, 20) (RankLLM-sized windows, many lists) and (256, 256) (long lists,
where the B×K×K pair tensors of the reference are 16.7 M elements each); kinds ranknet (plain
pairs), lambda (rank-dependent |ΔNDCG| weights) and listmle (sort + reverse logcumsumexp);
float32 scores, graded relevance in {0..4}, 10 % padding. A timed step is
``listwise_loss(scores, relevance, mask).sum().backward()``. Contenders: ``fastpref``
(backend="cpu"), ``eager`` (``listwise_loss_reference``), ``compiled`` (``torch.compile`` of the
reference, compiled and warmed up before timing). Peak memory is the rise of this process's
resident set during one step after a warm-up: VmHWM after resetting it through
/proc/self/clear_refs, minus VmRSS before the step, with glibc told to serve every allocation
above 128 KiB by mmap and to return it on free (so the resident set tracks live tensors).
The last test prints the markdown table of bench/README.md (ratios are within this one run).
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from fastpref.ops.listwise import listwise_loss, listwise_loss_reference

# FASTPREF_BENCH_QUICK=1 (bench/_common.py's convention): tiny shapes, to smoke-test this file.
QUICK = os.environ.get("FASTPREF_BENCH_QUICK", "0") not in ("", "0")
SHAPES = [(64, 20), (16, 64)] if QUICK else [(4096, 20), (256, 256)]
KINDS = ("ranknet", "lambda", "listmle")
CONTENDERS = ("fastpref", "eager", "compiled")
RESULTS: dict[tuple[str, int, int, str], dict[str, float]] = {}

try:  # M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1 (mallopt(3)); no-op where not glibc
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt(-3, 128 * 1024)
    _libc.mallopt(-1, 128 * 1024)
except OSError:  # pragma: no cover
    pass


def _inputs(B: int, K: int):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(B, K, generator=g).requires_grad_(True)
    relevance = torch.randint(0, 5, (B, K), generator=g).float()
    mask = torch.rand(B, K, generator=g) > 0.1
    return scores, relevance, mask


_compiled: dict[str, object] = {}


def _fn(contender: str, kind: str):
    if contender == "fastpref":
        return lambda s, r, m: listwise_loss(s, r, m, kind=kind, backend="cpu")
    eager = lambda s, r, m: listwise_loss_reference(s, r, m, kind=kind)  # noqa: E731
    if contender == "eager":
        return eager
    if kind not in _compiled:
        _compiled[kind] = torch.compile(eager, dynamic=False)
    return _compiled[kind]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rise_mib(step) -> float:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,K", SHAPES)
def test_listwise_fwd_bwd(benchmark, B, K, kind, contender):
    scores, relevance, mask = _inputs(B, K)
    fn = _fn(contender, kind)

    def step():
        scores.grad = None
        fn(scores, relevance, mask).sum().backward()

    step()  # warm-up (and compilation for the compiled contender)
    step()
    peak = _peak_rise_mib(step)
    benchmark.group = f"listwise {kind} B={B} K={K}"
    benchmark.extra_info.update(peak_rise_mib=peak, threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=3 if QUICK else 5, iterations=1, warmup_rounds=0)
    RESULTS[(kind, B, K, contender)] = {"median_s": benchmark.stats.stats.median, "peak": peak}


def test_print_table():
    """The table of bench/README.md; ratios = contender time / fastpref time, same run."""
    if not RESULTS:
        pytest.skip("no timings were collected in this run")
    lines = [
        "| kind | B | K | fastpref ms | eager ms | compiled ms | eager / fastpref "
        "| compiled / fastpref | peak rise MiB fastpref / eager / compiled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for B, K in SHAPES:
        for kind in KINDS:
            row = {c: RESULTS.get((kind, B, K, c)) for c in CONTENDERS}
            if any(v is None for v in row.values()):
                continue
            t = {c: row[c]["median_s"] * 1e3 for c in CONTENDERS}
            peaks = " / ".join(f"{row[c]['peak']:.1f}" for c in CONTENDERS)
            lines.append(
                f"| {kind} | {B} | {K} | {t['fastpref']:.1f} | {t['eager']:.1f} "
                f"| {t['compiled']:.1f} | {t['eager'] / t['fastpref']:.1f}x "
                f"| {t['compiled'] / t['fastpref']:.1f}x | {peaks} |"
            )
    print("\n" + "\n".join(lines))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
