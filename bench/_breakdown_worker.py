"""Worker for bench_step_breakdown.py: run ``fastpref-train`` in this process and break its steps
down with the PyTorch profiler.

    python bench/_breakdown_worker.py RESULT.json --timed 3 --profiled 3 -- <fastpref-train flags>

The run is the console script's (``fastpref.cli.train.main``); the observers below change no
computation, they only time it:

- a clock read at each metrics record (wall, process CPU), so a step is the interval between two
  step records (as in bench_train.py). Steps ``2 .. 1 + timed`` are timed without the profiler
  (step 1 warms up); each of the next ``profiled`` steps runs under its own ``torch.profiler``
  (CPU events), started just after the previous step's record is written and stopped at its
  own, so each profiled window is one whole step (less the writing of one metrics line);
- ``record_function`` ranges, present only in this process: ``fp:collate`` (the loop's
  ``task.collate``), ``fp:pack`` (``pack_rows``), ``fp:backbone`` (the decoder's forward, by
  module hooks), ``fp:forward`` (``task.step``), ``fp:backward`` (``engine.backward``) and
  ``fp:optimizer`` (``engine.step``: clipping, AdamW, zero_grad, the schedule);
- the reference precompute (``compute_reference_table``): the run's own call is timed (cold:
  its first batch pays one-time set-up), then the same call is repeated three times, its table
  discarded: twice timed (warm, what a long run pays per example; the faster counts) and once
  under the profiler, which splits it into rows.

After the run, in the same process, the GEMM rates of the floor are measured (``gemm_rates``).
Every profiler event's self time goes to exactly one row (``breakdown``); what the profiler saw
no op for (the Python between ops, the loop) is the window minus the events, so the rows sum to
the profiled window.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from _common import peak_rss_mb, require_native
from torch.autograd.profiler import record_function

# Rows of the breakdown, in table order. The reference rows come from the precompute.
ROWS = (
    "fused op fwd (lm_head; InfoNCE logits)",
    "fused op bwd (lm_head; InfoNCE logits)",
    "backbone linear GEMMs fwd",
    "backbone linear GEMMs bwd",
    "attention fwd",
    "attention bwd",
    "embedding fwd+bwd",
    "norms, activations, rest of backbone fwd",
    "norms, activations, rest of backbone bwd (+ autograd engine)",
    "loss, metrics, gathers (fwd + bwd)",
    "optimizer (DeepSpeed step: clip + AdamW)",
    "collation + packing",
    "Python and loop (no op traced)",
)
UNTRACED = ROWS[-1]

_NODE = "autograd::engine::evaluate_function: "


def classify_forward(names: list[str]) -> str:
    """The row of an event outside backward, from its name and its ancestors' (innermost
    first)."""

    def has(pred) -> bool:
        return any(pred(n) for n in names)

    if has(lambda n: n.startswith("fastpref::linear_logprobs_fwd")):
        return ROWS[0]
    if has(lambda n: n in ("fp:collate", "fp:pack")):
        return ROWS[11]
    if has(lambda n: n == "fp:optimizer"):
        return ROWS[10]
    if has(lambda n: n == "fp:backbone"):
        if has(lambda n: "scaled_dot_product" in n or "flash_attention" in n):
            return ROWS[4]
        if has(lambda n: n in ("aten::linear", "_OneDNNLinear")):  # fastpref.ops.linear
            return ROWS[2]
        if has(lambda n: n == "aten::embedding"):
            return ROWS[6]
        return ROWS[7]
    if has(lambda n: n == "fp:forward"):
        return ROWS[9]
    if has(lambda n: n == "fp:backward"):  # the engine's own work between nodes
        return ROWS[8]
    return UNTRACED  # traced ops outside every range (the loop's own tensor ops)


# a backward node's row, from the row of the forward op that made it (same sequence number)
_BACKWARD_OF = {ROWS[0]: ROWS[1], ROWS[2]: ROWS[3], ROWS[4]: ROWS[5], ROWS[6]: ROWS[6],
                ROWS[9]: ROWS[9]}  # fmt: skip


def breakdown(events, window_s: float) -> dict[str, float]:
    """Seconds per row over the profiled window; the untraced row makes them sum to it.

    An event inside a backward node (``autograd::engine::evaluate_function: X``) takes the
    backward row of the forward op that recorded X's sequence number: ``MmBackward0`` of a
    backbone ``aten::linear`` is a backbone GEMM, the same node of a matmul in the loss is the
    loss's; nodes without a forward op (``AccumulateGrad``) and the rest of the backbone go to
    its "rest ... bwd" row.
    """
    chains = []
    forward_row: dict[int, str] = {}
    for evt in events:
        chain, e = [], evt
        while e is not None:
            chain.append(e)
            e = e.cpu_parent
        node = next((c for c in chain if c.name.startswith(_NODE)), None)
        chains.append((evt, chain, node))
        if node is None and evt.sequence_nr >= 0:
            forward_row.setdefault(evt.sequence_nr, classify_forward([c.name for c in chain]))
    out: dict[str, float] = defaultdict(float)
    threads: dict[int, float] = defaultdict(float)
    for evt, chain, node in chains:
        if node is None:
            row = classify_forward([c.name for c in chain])
        elif "_LinearLogprobs" in node.name:
            row = ROWS[1]
        else:
            row = _BACKWARD_OF.get(forward_row.get(node.sequence_nr, ""), ROWS[8])
        self_s = evt.self_cpu_time_total / 1e6
        out[row] += self_s
        threads[evt.thread] += self_s
    traced = sum(out.values())
    out[UNTRACED] += window_s - traced
    return {"rows": {r: out.get(r, 0.0) for r in ROWS}, "traced_s": traced,
            "threads": {str(k): v for k, v in threads.items()}}  # fmt: skip


def _profile() -> torch.profiler.profile:
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def install(result: dict, timed: int, profiled: int) -> None:
    """The observers (see the module docstring)."""
    import fastpref.models.causal_lm as causal_lm
    import fastpref.train.loop as loop
    import fastpref.train.reference as reference
    from fastpref.train.runlog import RunLog

    # -- the reference precompute: timed, then repeated once under the profiler
    compute = reference.compute_reference_table
    result["precompute"] = []

    def timed_compute(task, scorer, examples, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        table = compute(task, scorer, examples, **kwargs)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        warm = []
        for _ in range(2):  # warm: what a long run pays per example (the faster of two)
            start = time.perf_counter()
            compute(task, scorer, examples, **kwargs)
            warm.append(time.perf_counter() - start)
        with _profile() as prof:
            t = time.perf_counter()
            compute(task, scorer, examples, **kwargs)
            prof_wall = time.perf_counter() - t
        rec = {"examples": len(examples), "wall_s": wall, "cpu_s": cpu, "warm_wall_s": min(warm),
               "warm_walls_s": warm}  # fmt: skip
        rec["profiled_s"] = prof_wall
        rec.update(breakdown(prof.events(), prof_wall))
        result["precompute"].append(rec)
        return table

    reference.compute_reference_table = timed_compute

    # -- ranges: collate, pack, task.step, backbone, engine.backward / engine.step
    def ranged(name, fn):
        def wrapper(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)

        return wrapper

    causal_lm.pack_rows = ranged("fp:pack", causal_lm.pack_rows)
    family_of = loop.family_of

    def observed_family(loss):
        family = family_of(loss)

        class Observed:
            def start(self, *args, **kwargs):
                task = family.start(*args, **kwargs)
                task.collate = ranged("fp:collate", task.collate)
                task.step = ranged("fp:forward", task.step)
                build = task.build_model

                def build_model(dist):
                    model = build(dist)
                    if model.hf_model is not None:
                        try:  # a decoder's stack; an encoder is its own backbone
                            body = causal_lm.backbone(model.hf_model)
                        except AttributeError:
                            body = model.hf_model
                        _range_module(body, "fp:backbone")
                    return model

                task.build_model = build_model
                return task

        return Observed()

    loop.family_of = observed_family
    make_engine = loop.make_engine

    def observed_engine(*args, **kwargs):
        engine, scheduler = make_engine(*args, **kwargs)
        engine.backward = ranged("fp:backward", engine.backward)
        engine.step = ranged("fp:optimizer", engine.step)
        return engine, scheduler

    loop.make_engine = observed_engine

    # -- the clock at every record; one profiler per step over steps timed+2 .. timed+1+profiled
    marks: list[dict] = []
    result["marks"], result["profiled"] = marks, []
    write = RunLog.write
    state: dict[str, object] = {"train_records": 0, "prof": None, "t0": 0.0}
    first_profiled = 1 + timed  # the step record after which profiling starts

    def clock() -> dict:
        return {"wall": time.perf_counter(), "cpu": time.process_time()}

    def clocked_write(self, record: dict) -> None:
        train = "tokens/s" in record
        now = clock()
        marks.append({**now, "train": train, "step": record.get("step"),
                      "tokens": record.get("tokens")})  # fmt: skip
        n = int(state["train_records"]) + train
        state["train_records"] = n
        if train and state["prof"] is not None:  # a profiled step ends here
            prof, window = state["prof"], now["wall"] - float(state["t0"])
            prof.stop()
            state["prof"] = None
            result["profiled"].append({"step": n, "window_s": window,
                                       **breakdown(prof.events(), window)})  # fmt: skip
        write(self, record)
        if train and first_profiled <= n < first_profiled + profiled:
            prof = _profile()
            prof.start()
            state["prof"], state["t0"] = prof, time.perf_counter()

    RunLog.write = clocked_write


def _range_module(module: torch.nn.Module, name: str) -> None:
    """A record_function range around every forward of ``module`` (hooks; nothing else)."""
    open_ranges: list = []

    def pre(_mod, _args, _kwargs):
        rf = record_function(name)
        rf.__enter__()
        open_ranges.append(rf)

    def post(_mod, _args, _kwargs, _out):
        open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)


# -- the GEMM rates of the floor ----------------------------------------------------------------

_ONEDNN_SRC = r"""
#include <ATen/ATen.h>
// ATen's oneDNN matmul, declared as csrc/include/fastpref/cpu_gemm.h declares it (exported by
// libtorch_cpu without an installed header): the call the fused op's fp32 tiles make.
namespace at::native {
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2,
                                         const Tensor& result, float beta, float alpha);
}
void onednn_mm(at::Tensor out, at::Tensor a, at::Tensor b) {
  TORCH_CHECK(&at::native::mkldnn_matmul != nullptr, "this torch exports no mkldnn_matmul");
  at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
}
"""


def onednn_mm():
    """``onednn_mm(out, a, b)``: out = a @ b through ``at::native::mkldnn_matmul``, the fused
    op's fp32 GEMM (csrc/include/fastpref/cpu_gemm.h), built once as a tiny extension."""
    from torch.utils.cpp_extension import load_inline

    ext = load_inline(
        "fastpref_bench_onednn_mm", cpp_sources=_ONEDNN_SRC, functions=["onednn_mm"],
        extra_cflags=["-O2"], verbose=False,
    )  # fmt: skip
    return ext.onednn_mm


def _best(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _rates(tag: str, M: int, K: int, N: int, mm, reps: int) -> dict:
    a, b = torch.randn(M, K), torch.randn(N, K)
    bt, flops, res = b.t(), 2.0 * M * K * N, torch.empty(M, N)
    out: dict[str, object] = {f"{tag}_shape": [M, K, N]}
    if mm is not None:
        mm(res, a, bt)
        out[f"{tag}_fp32_onednn_max_err_vs_mkl"] = (res - a @ bt).abs().max().item()
        out[f"{tag}_fp32_onednn"] = flops / _best(lambda: mm(res, a, bt), reps) / 1e9
    out[f"{tag}_fp32_mkl"] = flops / _best(lambda: torch.mm(a, bt, out=res), reps) / 1e9
    ab, bb = a.bfloat16(), b.bfloat16().t()
    out[f"{tag}_bf16"] = flops / _best(lambda: torch.mm(ab, bb), reps) / 1e9
    return out


def gemm_rates(vocab: int, rows: int, backbone_rows: int = 0, reps: int = 5) -> dict:
    """GFLOP/s (best of ``reps``) of a large square GEMM (M = N = K = 2048), of the lm_head
    shape ([rows, 256] @ [256, vocab]) and, with ``backbone_rows``, of the decoder's linear
    shapes (fwd of q/k/v/o, up/gate and down; the up projection's dW): fp32 through oneDNN (the
    op's path), fp32 ``torch.mm`` (MKL sgemm, what ``nn.Linear`` runs), bf16 ``torch.mm`` (ATen
    sends bf16 to oneDNN)."""
    torch.manual_seed(0)
    out: dict[str, object] = {}
    try:
        mm = onednn_mm()
    except Exception as e:  # noqa: BLE001 - no compiler: say so, keep the other rates
        mm, out["onednn_error"] = None, repr(e)
    shapes = [("square", (2048, 2048, 2048)), ("lm_head", (rows, 256, vocab))]
    if backbone_rows:  # the decoder's linears (hidden 256, intermediate 1024) at the batch's rows
        M = backbone_rows
        shapes += [("qkvo_fwd", (M, 256, 256)), ("up_fwd", (M, 256, 1024)),
                   ("down_fwd", (M, 1024, 256)), ("up_dW", (1024, M, 256))]  # fmt: skip
    for tag, (M, K, N) in shapes:
        out.update(_rates(tag, M, K, N, mm, reps))
    return out


def main() -> int:
    require_native()
    args = sys.argv[1:]
    sep = args.index("--")
    out, opts, argv = Path(args[0]), args[1:sep], args[sep + 1 :]
    kw = dict(zip(opts[::2], opts[1::2], strict=True))
    timed, profiled = int(kw.get("--timed", 3)), int(kw.get("--profiled", 3))
    vocab, rows = int(kw.get("--vocab", 32000)), int(kw.get("--gemm-rows", 1024))
    backbone_rows = int(kw.get("--backbone-rows", 0))
    result: dict = {"timed": timed, "profiled": profiled}
    install(result, timed, profiled)
    from fastpref.cli.train import main as cli_main

    rc = cli_main(argv)
    result["rc"] = rc
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_threads"] = torch.get_num_threads()
    train = [m for m in result["marks"] if m["train"]]
    # step i + 2 is the interval between the records of steps i + 1 and i + 2 (step 1 warms up)
    result["step_s"] = [b["wall"] - a["wall"] for a, b in zip(train, train[1:], strict=False)]
    result["step_tokens"] = [m["tokens"] for m in train]
    result["gemm"] = gemm_rates(vocab, rows, backbone_rows)
    out.write_text(json.dumps(result, indent=2, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
