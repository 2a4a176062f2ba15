"""RankLLM's training step and FIRST reranking (issue 15).

1. Combined step: rank_llm-style (``_rankllm_worker.py``: full ``[B, T, V]`` logits,
   ``log_softmax``, gather of the identifier logits, FIRST's weighted RankNet over pairs in
   PyTorch, loss = LM + 10 · rank, as rank_llm computes it) against ``fastpref-train --loss
   rankllm --objective combined --ranking-loss ranknet --weighted`` (``_fastpref_worker.py``: the
   console script in-process, step times read off its metrics records), on the same Llama
   (``_common.LLAMA``: hidden 256, 4 layers; vocabulary 32000 and 128256, built once per
   vocabulary with a fixed seed) and the same 8 prompts of 20 passages (the first 8 bundled
   reranking lists cut to 20 candidates, with a strict gold ranking so that both sides score all
   190 pairs with the same weights), tokenised once by the reranker family with the bundled
   reranker tokenizer. One process per run, float32, AdamW, clipping 1.0, micro-batch 8. Reported:
   tokens/s (every token through the model: prompt + target), peak resident set (VmHWM), the
   step-0 loss of both (asserted equal within 1e-5).
2. Reranking: windows/s of FIRST (``fastpref.models.rerank.first_orders``: one forward per
   batch of windows, no decoding) against decoding each window's permutation with
   ``generate()`` (60 new tokens = 3 per identifier, greedy, one window at a time, as
   ``fastpref-rerank --decode`` does), same model (vocabulary 32000), same 8 windows.

    flock /tmp/fastpref-bench.lock pytest bench/bench_reranker.py -p no:cacheprovider -s
    FASTPREF_BENCH_QUICK=1 pytest bench/bench_reranker.py -s     # tiny model: smoke test
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from _common import (
    BENCH_DIR,
    OFFLINE_ENV,
    QUICK,
    build_llama,
    hardware,
    loadavg,
    python_worker,
    run_child,
    write_json,
)

SEED = 0
LISTS, PASSAGES = 8, 20
if QUICK:
    VOCABS, WARMUP, TIMED, DECODE_TOKENS = (2048,), 1, 1, 6
else:
    VOCABS, WARMUP, TIMED, DECODE_TOKENS = (32000, 128256), 1, 3, 60
STEPS = WARMUP + TIMED
LOSS_ATOL = 1e-5
RESULTS: dict[str, dict] = {}
FLAGS = ["--objective", "combined", "--ranking-loss", "ranknet", "--weighted"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_reranker")


@pytest.fixture(scope="module")
def data(workdir: Path) -> dict:
    """8 lists of 20 passages as files for fastpref-train, and the same tokens for rank_llm."""
    from fastpref.families import get_objective
    from fastpref.families.reranker import BUNDLED_TOKENIZER, DEFAULT_DATA, FAMILY
    from fastpref.families.reranker_formats import load_rows
    from fastpref.paths import bundled_data
    from fastpref.train import parse_config

    rows = load_rows(str(bundled_data(DEFAULT_DATA)), "alpha")[: LISTS + 1]
    plain = []
    for r in rows:
        rel = r["relevance"][:PASSAGES]
        ranking = sorted(range(PASSAGES), key=lambda j: (-rel[j], j))  # strict: all 190 pairs
        plain.append({"qid": r["qid"], "query": r["query"],
                      "passages": r["passages"][:PASSAGES], "ranking": ranking})  # fmt: skip
    train_file, eval_file = workdir / "train.jsonl", workdir / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in plain[:LISTS]))
    eval_file.write_text(json.dumps(plain[LISTS]) + "\n")
    cfg = parse_config(["--loss", "rankllm", *FLAGS, "--tokenizer", str(BUNDLED_TOKENIZER)])
    task = FAMILY.start(get_objective("rankllm"), cfg, {})
    examples = task.prepare(task.read(str(train_file), None), str(train_file), "train")
    assert len(examples) == LISTS and all(len(e["id_tokens"]) == PASSAGES for e in examples)
    pad = task.tokenizer.pad_token_id
    L = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((LISTS, L), pad, dtype=torch.long)
    labels = torch.full((LISTS, L), -100, dtype=torch.long)  # rank_llm: ids, prompt masked
    rank_labels = []
    for b, e in enumerate(examples):
        n, p = len(e["input_ids"]), e["prompt_length"]
        ids[b, :n] = torch.tensor(e["input_ids"])
        labels[b, p:n] = ids[b, p:n]
        order = sorted(range(PASSAGES), key=lambda j: -e["relevance"][j])
        rank_labels.append([order.index(j) for j in range(PASSAGES)])
        assert e["first_pos"] == p  # the target's "[" is one token: rank_llm's source_len
    batch = {
        "input_ids": ids,
        "labels": labels,
        "rank_labels": rank_labels,
        "source_lens": [e["prompt_length"] for e in examples],
        "id_tokens": torch.tensor(examples[0]["id_tokens"]),
    }
    torch.save(batch, workdir / "batch.pt")
    tokens = sum(len(e["input_ids"]) for e in examples)
    return {"train": train_file, "eval": eval_file, "batch": workdir / "batch.pt",
            "tokens": tokens, "tokenizer": BUNDLED_TOKENIZER, "examples": examples,
            "task": task}  # fmt: skip


_MODELS: dict[int, Path] = {}


def model_dir(workdir: Path, data: dict, vocab: int) -> Path:
    if vocab not in _MODELS:
        _MODELS[vocab] = build_llama(
            workdir / f"llama_v{vocab}", vocab, data["tokenizer"], quick=QUICK, seed=SEED
        )
    return _MODELS[vocab]


def run_rankllm(workdir: Path, data: dict, vocab: int) -> dict:
    out = workdir / f"rankllm_v{vocab}.json"
    cmd = python_worker(
        "_rankllm_worker.py", str(data["batch"]), str(model_dir(workdir, data, vocab)),
        str(out), str(STEPS),
    )  # fmt: skip
    run_child(cmd, env=OFFLINE_ENV, timeout=3600).check()
    r = json.loads(out.read_text())
    return {"step_s": r["step_s"], "step0_loss": r["losses"][0], "peak_rss_mb": r["peak_rss_mb"]}


def run_fastpref(workdir: Path, data: dict, vocab: int) -> dict:
    tag = f"fastpref_v{vocab}"
    out, out_dir = workdir / f"{tag}.json", workdir / tag
    cmd = python_worker(
        "_fastpref_worker.py", str(out), "--",
        "--loss", "rankllm", *FLAGS,
        "--model", str(model_dir(workdir, data, vocab)),
        "--data", str(data["train"]), "--eval-split", str(data["eval"]),
        "--eval-every", str(10**6), "--output-dir", str(out_dir),
        "--micro-batch", str(LISTS), "--max-steps", str(STEPS),
        "--lr", "1e-6", "--scheduler", "constant", "--warmup-ratio", "0",
        "--max-grad-norm", "1.0", "--seed", str(SEED), "--no-progress",
    )  # fmt: skip
    run_child(cmd, env=OFFLINE_ENV, timeout=3600).check()
    r = json.loads(out.read_text())
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x]
    steps = [rec for rec in records if "tokens/s" in rec]
    assert len(steps) == STEPS and steps[0]["tokens"] == data["tokens"]
    marks = r["log_marks"]
    first = next(i for i, m in enumerate(marks) if m["train"])
    window = marks[first - 1 : first + STEPS]  # a step: from the previous record to its own
    step_s = [b["wall"] - a["wall"] for a, b in zip(window, window[1:], strict=False)]
    return {"step_s": step_s, "step0_loss": steps[0]["loss"], "peak_rss_mb": r["peak_rss_mb"]}


@pytest.mark.parametrize("vocab", VOCABS)
def test_combined_step(workdir: Path, data: dict, vocab: int) -> None:
    load = loadavg()
    theirs, ours = run_rankllm(workdir, data, vocab), run_fastpref(workdir, data, vocab)
    t_theirs = sum(theirs["step_s"][WARMUP:]) / TIMED
    t_ours = sum(ours["step_s"][WARMUP:]) / TIMED
    RESULTS[f"combined_v{vocab}"] = {
        "vocab": vocab,
        "rankllm_tokens_s": data["tokens"] / t_theirs,
        "fastpref_tokens_s": data["tokens"] / t_ours,
        "speedup": t_theirs / t_ours,
        "rankllm_peak_mb": theirs["peak_rss_mb"],
        "fastpref_peak_mb": ours["peak_rss_mb"],
        "memory_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
        "rankllm_step0_loss": theirs["step0_loss"],
        "fastpref_step0_loss": ours["step0_loss"],
        "load_before": load,
        "load_after": loadavg(),
    }
    print(json.dumps(RESULTS[f"combined_v{vocab}"], indent=2))
    assert abs(ours["step0_loss"] - theirs["step0_loss"]) <= LOSS_ATOL, RESULTS


def test_first_vs_decoding(workdir: Path, data: dict) -> None:
    from transformers import AutoModelForCausalLM

    from fastpref.models.rerank import ListwiseRanker, Window, first_orders

    model = AutoModelForCausalLM.from_pretrained(
        model_dir(workdir, data, VOCABS[0]), attn_implementation="sdpa"
    ).eval()
    task, pad = data["task"], data["task"].tokenizer.pad_token_id
    windows = [
        Window(prompt_ids=e["input_ids"][: e["prompt_length"]], id_tokens=e["id_tokens"])
        for e in data["examples"]
    ]
    ranker, open_ids = ListwiseRanker(model).eval(), task.encoder.ids.open_ids
    load = loadavg()
    first_orders(ranker, windows[:1], open_ids, pad, "cpu")  # warm-up
    timings = {}
    for name, size in (("first_batched", len(windows)), ("first_single", 1)):
        start = time.perf_counter()
        for i in range(0, len(windows), size):
            first_orders(ranker, windows[i : i + size], open_ids, pad, "cpu")
        timings[name] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w.prompt_ids])
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, pad_token_id=pad,
            )  # fmt: skip
    timings["decode"] = time.perf_counter() - start
    n = len(windows)
    RESULTS["rerank"] = {
        "windows": n,
        "decode_tokens": DECODE_TOKENS,
        **{f"{k}_windows_s": n / v for k, v in timings.items()},
        "first_batched_vs_decode": timings["decode"] / timings["first_batched"],
        "first_single_vs_decode": timings["decode"] / timings["first_single"],
        "load_before": load,
        "load_after": loadavg(),
    }
    print(json.dumps(RESULTS["rerank"], indent=2))


def test_zz_write_results() -> None:
    if not RESULTS:
        pytest.skip("nothing measured")
    out = BENCH_DIR / "results" / ("reranker_quick.json" if QUICK else "reranker.json")
    out.parent.mkdir(exist_ok=True)
    write_json(out, {"hardware": hardware(), "results": RESULTS})
    lines = [
        "| vocab | rank_llm-style tok/s | fastpref tok/s | speedup | peak MiB rank_llm / "
        "fastpref | memory ratio | step-0 loss rank_llm / fastpref |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in RESULTS.items():
        if key.startswith("combined"):
            lines.append(
                f"| {r['vocab']} | {r['rankllm_tokens_s']:.0f} | {r['fastpref_tokens_s']:.0f} | "
                f"{r['speedup']:.2f}x | {r['rankllm_peak_mb']:.0f} / {r['fastpref_peak_mb']:.0f} | "
                f"{r['memory_ratio']:.2f}x | {r['rankllm_step0_loss']:.6f} / "
                f"{r['fastpref_step0_loss']:.6f} |"
            )
    if "rerank" in RESULTS:
        r = RESULTS["rerank"]
        lines += [
            "",
            f"FIRST {r['first_batched_windows_s']:.2f} windows/s batched, "
            f"{r['first_single_windows_s']:.2f} one at a time; decoding {r['decode_tokens']} "
            f"tokens {r['decode_windows_s']:.3f} windows/s: FIRST "
            f"{r['first_batched_vs_decode']:.1f}x (batched), "
            f"{r['first_single_vs_decode']:.1f}x (one window per forward)",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
