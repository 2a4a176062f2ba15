"""A decoder's RMSNorm and SwiGLU in one native pass each (``fastpref.ops.decoder``) against
transformers' ATen formulas, issue 18: the same modules, same process, interleaved repeats.

- **Ops**: RMSNorm fwd + bwd on ``[1624, 256]`` (the DPO step's packed rows x hidden) and
  SwiGLU fwd + bwd on ``[1624, 2 x 1024]`` (the fused gate/up output), float32 and bfloat16; the
  ATen side is ``LlamaRMSNorm``'s lines and ``F.silu(gate) * up`` on the two halves.
- **DPO step** (training part, no optimizer): the ``bench_onednn_linear`` case (tiny Llama of
  ``_common.LLAMA``, vocabulary 32000, 8 packed pairs, fused lm_head, backward) with its linears
  routed through oneDNN, its rows aligned to the padding and a row-sparse embedding gradient,
  as the trainer runs it; the norms
  and MLPs swapped once (``use_fused_decoder_ops``) and ``FASTPREF_DECODER_OPS`` toggling the
  path per call (``aten``: the modules' own forward, gate and up as two GEMMs).

Reported: median and min seconds, the ratio of medians. Results: ``results/decoder_ops.*``.

    flock /tmp/fastpref-bench.lock pytest bench/bench_decoder_ops.py -q -s
    FASTPREF_BENCH_QUICK=1 pytest bench/bench_decoder_ops.py -q -s   # smoke test
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F
from _common import BENCH_DIR, QUICK, hardware, loadavg, write_json
from bench_onednn_linear import _dpo_case

import fastpref.ops.linear as fl
from fastpref.ops.decoder import _rms_norm_aten, rms_norm, swiglu, use_fused_decoder_ops
from fastpref.ops.linear import use_onednn_linears

REPEATS = 3 if QUICK else 12
OP_REPEATS = 5 if QUICK else 40
ROWS = 64 if QUICK else 1624


def _op_cases(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 256, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(256, generator=g)).to(dtype).requires_grad_()
    gy = torch.randn(ROWS, 256, generator=g).to(dtype)
    gu = torch.randn(ROWS, 2048, generator=g).to(dtype).requires_grad_()
    gh = torch.randn(ROWS, 1024, generator=g).to(dtype)

    def norm(native: bool):
        y = rms_norm(x, w, 1e-6) if native else _rms_norm_aten(x, w, 1e-6)
        y.backward(gy)
        x.grad = w.grad = None

    def mlp(native: bool):
        if native:
            h = swiglu(gu)
        else:
            gate, up = gu.chunk(2, -1)
            h = F.silu(gate) * up
        h.backward(gh)
        gu.grad = None

    name = str(dtype).removeprefix("torch.")
    return [(f"RMSNorm fwd+bwd [{ROWS}, 256] {name}", norm, OP_REPEATS),
            (f"SwiGLU fwd+bwd [{ROWS}, 2 x 1024] {name}", mlp, OP_REPEATS)]  # fmt: skip


def _dpo_step_case():
    policy, step = _dpo_case()
    os.environ["FASTPREF_CPU_GEMM"] = "onednn"
    use_onednn_linears(policy)
    policy.row_multiple = fl.ROW_PAD
    for m in policy.modules():  # row-sparse, as the trainer makes it (engine.sparse_embedding_...)
        if isinstance(m, torch.nn.Embedding):
            m.sparse = True
    swapped = use_fused_decoder_ops(policy)
    assert swapped > 0

    def run(native: bool):
        os.environ["FASTPREF_DECODER_OPS"] = "native" if native else "aten"
        step()

    return ("DPO step, tiny Llama, V=32000, oneDNN linears", run, REPEATS), swapped


def _measure(case) -> dict:
    name, fn, repeats = case
    times = {"aten": [], "native": []}
    for native in (False, True, False, True):  # warm-up
        fn(native)
    for _ in range(repeats):
        for mode in times:
            t0 = time.perf_counter()
            fn(mode == "native")
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"case": name, "aten_median_s": med["aten"], "aten_min_s": min(times["aten"]),
            "native_median_s": med["native"], "native_min_s": min(times["native"]),
            "native_over_aten": med["native"] / med["aten"], "times": times}  # fmt: skip


def test_decoder_ops_native_vs_aten():
    load_before = loadavg()
    try:
        dpo, swapped = _dpo_step_case()
        cases = _op_cases(torch.float32) + _op_cases(torch.bfloat16) + [dpo]
        rows = [_measure(c) for c in cases]
    finally:
        os.environ.pop("FASTPREF_DECODER_OPS", None)
        os.environ.pop("FASTPREF_CPU_GEMM", None)
    lines = ["| case | ATen formulas s median (min) | native s median (min) | native / ATen |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['aten_median_s']:.5f} ({r['aten_min_s']:.5f}) "
            f"| {r['native_median_s']:.5f} ({r['native_min_s']:.5f}) "
            f"| {r['native_over_aten']:.3f}x |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    info = {"hardware": hardware(), "load_before": load_before, "load_after": loadavg(),
            "modules_swapped_in_the_dpo_model": swapped}  # fmt: skip
    print(info)
    if not QUICK:
        out = BENCH_DIR / "results"
        (out / "decoder_ops.md").write_text(table + "\n")
        write_json(out / "decoder_ops.json", {**info, "repeats": REPEATS, "rows": rows})
    assert all(len(r["times"]["native"]) == len(r["times"]["aten"]) > 0 for r in rows)
