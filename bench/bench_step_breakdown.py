"""Where a ``fastpref-train --loss dpo`` step goes, against its FLOP floor (issue 18).

The step of ``bench_train.py`` at the issue's shapes: 8 pairs a step of ~60-token prompts and
~63-token completions (EOS included), the small Llama of ``_common.LLAMA`` (hidden 256, 4 layers,
intermediate 1024), vocabulary 32000 and 128256, float32, DPO sigmoid beta 0.1, AdamW, clipping
1.0, the reference precomputed before the loop (fastpref-train's default). The data's tokens
reach the whole vocabulary: a word-level tokenizer with one token per word ``w<id>`` for every
id of the vocabulary, and rows of words drawn uniformly from it (seeded), so every 4096-row
block of the embedding and its AdamW state is touched (the bundled tokenizer's 1024 tokens reach
only the first block, which the optimizer's untouched-block skip rewards).

Per case one process (``_breakdown_worker.py``) runs the console script: one warm-up step,
``TIMED`` steps timed by the clock at each metrics record, then ``PROFILED`` steps, each under its
own PyTorch profiler; the step of median length is reported (and the median unprofiled step: on
the shared 2 cores a descheduled OpenMP thread stalls every parallel op of some steps). Each
profiler event's self time goes to one row (``_breakdown_worker.breakdown``: the fused op's fwd /
bwd ops; ``aten::linear`` inside the backbone's forward, and the backward nodes those recorded
(matched by sequence number), for the backbone's GEMMs; SDPA and its backward node; the
optimizer's, collation's and packing's ranges; the rest of the backbone; loss and metrics), and
the time no event covers (Python between ops, the loop) is its own row, so the rows sum to the
profiled step. The reference rows are the step's share (8 of the run's examples) of a warm repeat
of the precompute (the run's own, cold call pays one-time set-up in its first batch; it is in the
JSON), split by a profiled repeat.

The FLOPs of a step are counted from the shapes of the reported step's batch (the packed batch
the backbone sees, the scored rows the lm_head sees): policy backbone 3x and reference 1x
``2 * tokens * linear params`` plus attention ``4 L^2 D`` per packed row and layer (fwd; bwd 2x),
policy lm_head 4 GEMMs (logits, recomputed logits, dH, dW) and reference 1 of ``2 N D V``. The
floor is that count at the rate of a large GEMM (M = N = K = 2048) measured in the same process
after the run: fp32 through ``at::native::mkldnn_matmul`` (oneDNN, the fused op's tile path,
``csrc/include/fastpref/cpu_gemm.h``, built as a small inline extension), and bf16 ``torch.mm``
(ATen sends bf16 to oneDNN); MKL's fp32 ``torch.mm`` for comparison.

    flock /tmp/fastpref-bench.lock pytest bench/bench_step_breakdown.py -s -p no:cacheprovider
    FASTPREF_BENCH_BF16=1 ...   # the DPO steps with fastpref-train --bf16, against the bf16 floor
    FASTPREF_BENCH_QUICK=1 pytest bench/bench_step_breakdown.py -s    # tiny model: smoke test

Results: ``bench/results/step_breakdown.{json,md}`` (``step_breakdown_bf16.*`` with
``FASTPREF_BENCH_BF16=1``).
"""

from __future__ import annotations

import json
import os
import random
import statistics
from pathlib import Path

import pytest
from _breakdown_worker import ROWS
from _common import (
    BENCH_DIR,
    LLAMA,
    LLAMA_QUICK,
    OFFLINE_ENV,
    QUICK,
    build_llama,
    hardware,
    loadavg,
    python_worker,
    run_child,
)

SEED = 0
BETA, LR = 0.1, 1e-6
if QUICK:
    VOCABS, MICRO_BATCH, TIMED, PROFILED = (4096,), 2, 1, 1
    EMBED_BATCH, LISTS = 8, 2
else:
    VOCABS, MICRO_BATCH, TIMED, PROFILED = (32000, 128256), 8, 5, 5
    EMBED_BATCH, LISTS = 64, 8
STEPS = 1 + TIMED + PROFILED
# (case, vocabulary): the DPO step at both vocabularies, then the embedding step (infonce on the
# bundled all-MiniLM-L6-v2, its own 30522-token vocabulary) and the reranker step (rankllm
# combined on the small Llama, the bundled reranker tokenizer's 957 tokens)
CASES = [("dpo", v) for v in VOCABS] + [("infonce", 30522), ("rankllm", VOCABS[0])]
# FASTPREF_BENCH_BF16=1: the DPO steps with --bf16 (bf16 weights and activations, fp32 master
# weights in DeepSpeed's optimizer, fp32 accumulation in the fused op), read against the bf16 floor
BF16 = os.environ.get("FASTPREF_BENCH_BF16") == "1"
if BF16:
    CASES = [("dpo", v) for v in VOCABS]
SUFFIX = "_bf16" if BF16 else ""
PASSAGES, EMBED_MAX_LENGTH = 20, 32
PROMPT_WORDS = (50, 68)  # + BOS: ~60 prompt tokens
COMPLETION_WORDS = (52, 72)  # + EOS: ~63 completion tokens
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
RESULTS: dict[str, dict] = {}
FUSED_FWD, FUSED_BWD = ROWS[0], ROWS[1]


def word_tokenizer(out_dir: Path, vocab: int):
    """A word-level tokenizer of exactly ``vocab`` tokens: 4 specials, then ``w4 .. w<vocab-1>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIAL)}
    words.update({f"w{i}": i for i in range(len(SPECIAL), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    fast.save_pretrained(out_dir)
    return fast


def word_rows(n: int, vocab: int, seed: int) -> list[dict]:
    """``n`` pair rows of words drawn uniformly from the whole vocabulary."""
    rng = random.Random(seed)

    def text(lo_hi: tuple[int, int]) -> str:
        return " ".join(
            f"w{rng.randrange(len(SPECIAL), vocab)}" for _ in range(rng.randint(*lo_hi))
        )

    return [
        {"prompt": text(PROMPT_WORDS), "chosen": text(COMPLETION_WORDS),
         "rejected": text(COMPLETION_WORDS)}
        for _ in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_step_breakdown")


def prepare(workdir: Path, vocab: int) -> dict:
    """Tokenizer, model, train/eval files for one vocabulary; the tokenised training examples."""
    from fastpref.families.lm_formats import tokenize_rows

    tok_dir = workdir / f"tokenizer_v{vocab}"
    tok = word_tokenizer(tok_dir, vocab)
    model = build_llama(workdir / f"llama_v{vocab}", vocab, tok_dir, quick=QUICK, seed=SEED)
    n = STEPS * MICRO_BATCH
    rows = word_rows(n + 1, vocab, SEED)
    files = {"train": workdir / f"train_v{vocab}.jsonl", "eval": workdir / f"eval_v{vocab}.jsonl"}
    for key, part in (("train", rows[:n]), ("eval", rows[n:])):
        files[key].write_text("".join(json.dumps(r) + "\n" for r in part))
    examples = tokenize_rows(rows[:n], "pair", tok, max_length=10**6)
    max_length = max(len(ids) for ex in examples for ids in ex["input_ids"])
    ids = {i for ex in examples for seq in ex["input_ids"] for i in seq}
    return {"model": model, "files": files, "examples": examples, "max_length": max_length,
            "pad_id": tok.pad_token_id, "distinct_tokens": len(ids)}  # fmt: skip


# -- FLOPs from the shapes ----------------------------------------------------------------------


def step_shapes(prep: dict, step: int) -> dict:
    """The packed batch of step ``step`` (0-based) as the trainer builds it."""
    from fastpref.families.lm_formats import collate
    from fastpref.models.packing import pack_rows
    from fastpref.train.loop import _stream_indices

    examples = prep["examples"]
    idx = _stream_indices(len(examples), SEED, step * MICRO_BATCH, MICRO_BATCH)
    batch = collate([examples[i] for i in idx], "pair", prep["pad_id"])
    packed = pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert packed is not None, "the bench batch must pack (it does in the trainer)"
    rows, L = packed.input_ids.shape
    real = 0
    for ex in (examples[i] for i in idx):  # one copy of the prompt, then each completion
        lengths = zip(ex["input_ids"], ex["prompt_lengths"], strict=True)
        real += ex["prompt_lengths"][0] + sum(len(seq) - p for seq, p in lengths)
    return {"rows": rows, "L": L, "slots": rows * L, "real_tokens": real,
            "scored": int(packed.targets.numel())}  # fmt: skip


def step_flops(shape: dict, vocab: int) -> dict[str, float]:
    """GFLOP of one DPO step at these shapes (see the module docstring)."""
    cfg = LLAMA_QUICK if QUICK else LLAMA
    D, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = D * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    linear_params = layers * (2 * D * D + 2 * D * kv + 3 * D * inter)
    fwd_linear = 2.0 * shape["slots"] * linear_params
    fwd_attn = 4.0 * shape["rows"] * shape["L"] ** 2 * D * layers
    head = 2.0 * shape["scored"] * D * vocab
    g = {
        "policy backbone linear (fwd + bwd)": 3 * fwd_linear,
        "policy attention (fwd + bwd)": 3 * fwd_attn,
        "policy lm_head (4 GEMMs)": 4 * head,
        "reference backbone (linear + attention fwd)": fwd_linear + fwd_attn,
        "reference lm_head (1 GEMM)": head,
    }
    return {k: v / 1e9 for k, v in g.items()}


# -- the other steps: embedding (infonce) and reranker (rankllm combined) -------------------------


def prepare_infonce(workdir: Path) -> dict:
    """Bundled retrieval triples, one positive and one hard negative each (bench_embedding's)."""
    from fastpref.families.embedding import BUNDLED
    from fastpref.models.embedding import resolve_model_path
    from fastpref.paths import bundled_data

    out = []
    for line in bundled_data(BUNDLED["triples"]).read_text().splitlines():
        r = json.loads(line)
        out.append({"query": r["query"], "positives": r["positives"][:1],
                    "negatives": r["negatives"][:1]})  # fmt: skip
    files = {"train": workdir / "triples.jsonl", "eval": workdir / "triples_eval.jsonl"}
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in out[1:]))
    files["eval"].write_text(json.dumps(out[0]) + "\n")
    flags = ["--num-negatives", "1", "--max-length", str(EMBED_MAX_LENGTH), "--embed-chunk", "0",
             "--micro-batch", str(EMBED_BATCH), "--lr", "2e-5"]  # fmt: skip
    return {"model": resolve_model_path(None), "files": files, "flags": flags}


def prepare_rankllm(workdir: Path, vocab: int) -> dict:
    """The first bundled reranking lists cut to 20 passages with a strict gold ranking."""
    from fastpref.families.reranker import BUNDLED_TOKENIZER, DEFAULT_DATA
    from fastpref.families.reranker_formats import load_rows
    from fastpref.paths import bundled_data

    rows = load_rows(str(bundled_data(DEFAULT_DATA)), "alpha")[: LISTS + 1]
    plain = []
    for r in rows:
        rel = r["relevance"][:PASSAGES]
        ranking = sorted(range(PASSAGES), key=lambda j: (-rel[j], j))
        plain.append({"qid": r["qid"], "query": r["query"],
                      "passages": r["passages"][:PASSAGES], "ranking": ranking})  # fmt: skip
    files = {"train": workdir / "rerank.jsonl", "eval": workdir / "rerank_eval.jsonl"}
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in plain[:LISTS]))
    files["eval"].write_text(json.dumps(plain[LISTS]) + "\n")
    model = build_llama(workdir / f"rr_llama_v{vocab}", vocab, BUNDLED_TOKENIZER, quick=QUICK,
                        seed=SEED)  # fmt: skip
    flags = ["--objective", "combined", "--ranking-loss", "ranknet", "--weighted",
             "--micro-batch", str(LISTS), "--lr", str(LR)]  # fmt: skip
    return {"model": model, "files": files, "flags": flags}


# -- the run ------------------------------------------------------------------------------------


def run(workdir: Path, prep: dict, case: str, vocab: int) -> dict:
    tag = f"{case}_v{vocab}"
    out_dir, cache = workdir / f"run_{tag}", workdir / f"cache_{tag}"
    out = workdir / f"breakdown_{tag}.json"
    if case == "dpo":
        flags = ["--micro-batch", str(MICRO_BATCH), "--max-length", str(prep["max_length"]),
                 "--beta", str(BETA), "--lr", str(LR)]  # fmt: skip
    else:
        flags = prep["flags"]
    cmd = python_worker(
        "_breakdown_worker.py", str(out),
        "--timed", str(TIMED), "--profiled", str(PROFILED),
        "--vocab", str(vocab), "--gemm-rows", str(2 * MICRO_BATCH * 64),
        "--backbone-rows", str(step_shapes(prep, 1)["slots"] if case == "dpo" else 0), "--",
        "--loss", case,
        "--model", str(prep["model"]),
        "--data", str(prep["files"]["train"]),
        "--eval-split", str(prep["files"]["eval"]),
        "--eval-every", str(10**6),
        "--output-dir", str(out_dir),
        "--cache-dir", str(cache),
        "--max-steps", str(STEPS),
        "--scheduler", "constant",
        "--warmup-ratio", "0",
        "--max-grad-norm", "1.0",
        "--seed", str(SEED),
        "--no-progress",
        *flags,
        *(["--bf16"] if BF16 else []),
    )  # fmt: skip
    run_child(cmd, env=OFFLINE_ENV, timeout=3600).check()
    return json.loads(out.read_text())


def summarise(r: dict, prep: dict, case: str, vocab: int) -> dict:
    """Seconds per step by row; for DPO also FLOPs, floor and ratios."""
    # the shared cores make some steps slow (a descheduled OpenMP thread stalls every parallel
    # op): the profiled step of median length is reported, and the median unprofiled step
    by_length = sorted(r["profiled"], key=lambda p: p["window_s"])
    median = by_length[(len(by_length) - 1) // 2]
    rows = dict(median["rows"])
    # the reference: this step's share of the train split's precompute (8 of its examples)
    ref_wall = ref_head = cold = 0.0
    if r["precompute"]:
        pre = max(r["precompute"], key=lambda p: p["examples"])
        share = MICRO_BATCH / pre["examples"]
        ref_wall, cold = pre["warm_wall_s"] * share, pre["wall_s"] * share
        ref_head = pre["rows"][FUSED_FWD] * pre["warm_wall_s"] / pre["profiled_s"] * share
    rows["reference pass: fused op fwd (precompute share)"] = ref_head
    rows["reference pass: backbone + rest (precompute share)"] = ref_wall - ref_head
    profiled_step = median["window_s"] + ref_wall
    # unprofiled steps: step 2 .. 1 + TIMED (step_s[i] is step i + 2)
    timed = r["step_s"][:TIMED]
    step = statistics.median(timed) + ref_wall
    out = {"rows": rows, "profiled_step_s": profiled_step, "step_s": step, "step_s_timed": timed,
           "profiled_windows_s": [p["window_s"] for p in r["profiled"]],
           "median_profiled_step": median["step"],
           "reference_share_s": ref_wall, "reference_share_cold_s": cold, "gemm": r["gemm"],
           "peak_rss_mb": r["peak_rss_mb"], "torch_threads": r["torch_threads"],
           # the faster fp32 library: oneDNN on AMD, MKL on Intel (cpu_gemm.h picks the same)
           "fp32_rate": max(r["gemm"].get("square_fp32_onednn", 0.0),
                            r["gemm"]["square_fp32_mkl"]),
           "bf16_rate": r["gemm"]["square_bf16"]}  # fmt: skip
    if case != "dpo":
        return out
    shapes = [step_shapes(prep, median["step"] - 1)]  # that step's batch (steps count from 1)
    mean_shape = {k: sum(s[k] for s in shapes) / len(shapes) for k in shapes[0]}
    flops = {k: sum(step_flops(s, vocab)[k] for s in shapes) / len(shapes)
             for k in step_flops(shapes[0], vocab)}  # fmt: skip
    total = sum(flops.values())
    fp32, bf16 = out["fp32_rate"], out["bf16_rate"]
    out.update({
        "shape": mean_shape,
        "gflop": flops,
        "gflop_total": total,
        "floor_fp32_s": total / fp32,
        "floor_bf16_s": total / bf16,
        "achieved_gflops": total / step,
        "step_over_floor_fp32": step / (total / fp32),
        "step_over_floor_bf16": step / (total / bf16),
        "distinct_tokens": prep["distinct_tokens"],
    })  # fmt: skip
    return out


@pytest.mark.parametrize(("case", "vocab"), CASES, ids=[f"{c}-{v}" for c, v in CASES])
def test_step_breakdown(benchmark, workdir: Path, case: str, vocab: int) -> None:
    if case == "dpo":
        prep = prepare(workdir, vocab)
    elif case == "infonce":
        prep = prepare_infonce(workdir)
    else:
        prep = prepare_rankllm(workdir, vocab)
    load_before = loadavg()
    r = benchmark.pedantic(lambda: run(workdir, prep, case, vocab), rounds=1, iterations=1)
    s = summarise(r, prep, case, vocab)
    s["loadavg"] = (load_before, loadavg())
    RESULTS[f"{case}-{vocab}"] = {"summary": s, "raw": r}
    benchmark.group = "step breakdown"
    benchmark.extra_info.update(case=case, vocab=vocab,
                                **{k: v for k, v in s.items() if k != "rows"})  # fmt: skip
    # the rows account for the profiled steps: nothing double-counted, nothing lost
    rows = s["rows"]
    assert abs(sum(rows.values()) - s["profiled_step_s"]) < 1e-6 * max(1, s["profiled_step_s"])
    # The profiler's self times of nested events may overlap a little (the routed linears'
    # Function and its cpu_mm calls: up to -3.6 ms of a 1 s InfoNCE step seen); more than 1% of
    # the step would be a real double count.
    assert rows["Python and loop (no op traced)"] >= -0.01 * s["profiled_step_s"], rows
    assert rows[FUSED_BWD] > 0 and rows["backbone linear GEMMs bwd"] > 0, rows


def table(results: dict[str, dict]) -> str:
    """Rows x cases: seconds per step and share of the (profiled) step; FLOP lines for DPO."""
    keys = [k for k in (f"{c}-{v}" for c, v in CASES) if k in results]
    names = {"dpo": "DPO V={}", "infonce": "InfoNCE (MiniLM)", "rankllm": "RankLLM V={}"}
    title = [names[k.split("-")[0]].format(k.split("-")[1]) for k in keys]
    lines = ["| row | " + " | ".join(f"{t} s/step | %" for t in title) + " |",
             "|---|" + "---:|---:|" * len(keys)]  # fmt: skip
    summaries = [results[k]["summary"] for k in keys]
    for name in summaries[0]["rows"]:
        cells = [f"{s['rows'][name]:.4f} | {100 * s['rows'][name] / s['profiled_step_s']:.1f}"
                 for s in summaries]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def line(label, key, fmt="{:.4f}"):
        cells = [(fmt.format(s[key]) if key in s else "-") + " | " for s in summaries]
        return f"| **{label}** | " + " | ".join(cells) + "|"

    lines += [
        "| **sum = profiled step** | " + " | ".join(
            f"**{s['profiled_step_s']:.4f}** | 100.0" for s in summaries) + " |",
        line("step without the profiler (median of the timed steps)", "step_s"),
        line("GFLOP of the step (from the shapes)", "gflop_total", "{:.1f}"),
        line("fp32 GEMM GFLOP/s (2048^3, faster of oneDNN and MKL, same run)", "fp32_rate",
             "{:.0f}"),
        line("bf16 GEMM GFLOP/s (2048^3, same run)", "bf16_rate", "{:.0f}"),
        line("fp32 floor s (GFLOP / fp32 rate)", "floor_fp32_s"),
        line("bf16 floor s (GFLOP / bf16 rate)", "floor_bf16_s"),
        line("achieved GFLOP/s (unprofiled step)", "achieved_gflops", "{:.0f}"),
        line("step / fp32 floor", "step_over_floor_fp32", "{:.2f}x"),
        line("step / bf16 floor", "step_over_floor_bf16", "{:.2f}x"),
    ]  # fmt: skip
    return "\n".join(lines)


def test_report(workdir: Path) -> None:
    keys = [f"{c}-{v}" for c, v in CASES]
    if not any(k in RESULTS for k in keys):
        pytest.skip("no case ran (deselected or failed)")
    text = table(RESULTS)
    detail_keys = ("gflop", "shape", "gemm", "step_s_timed", "profiled_windows_s",
                   "reference_share_s",
                   "reference_share_cold_s", "peak_rss_mb", "distinct_tokens",
                   "loadavg")  # fmt: skip
    detail = {k: {d: RESULTS[k]["summary"].get(d) for d in detail_keys}
              for k in keys if k in RESULTS}  # fmt: skip
    out = workdir if QUICK else BENCH_DIR / "results"
    out.mkdir(parents=True, exist_ok=True)
    import fastpref

    src = Path(fastpref.__file__).resolve().parent.parent  # the code measured (a worktree?)
    commit = os.popen(f"git -C {src} rev-parse --short HEAD").read().strip()
    dirty = bool(os.popen(f"git -C {src} status --porcelain -- fastpref csrc").read().strip())
    meta = {"hardware": hardware(), "cpu_family": _cpu_family(), "micro_batch_pairs": MICRO_BATCH,
            "timed_steps": TIMED, "profiled_steps": PROFILED, "fastpref_source": str(src),
            "commit": commit, "uncommitted_changes_in_fastpref_or_csrc": dirty, "bf16": BF16,
            "missing": [k for k in keys if k not in RESULTS]}  # fmt: skip
    (out / f"step_breakdown{SUFFIX}.md").write_text(text + "\n")
    (out / f"step_breakdown{SUFFIX}.json").write_text(json.dumps(
        {"meta": meta, "runs": {k: RESULTS[k] for k in keys if k in RESULTS}},
        indent=2, default=str,
    ))  # fmt: skip
    print("\n" + text)
    print(json.dumps({"meta": meta, "detail": detail}, indent=2, default=str))


def _cpu_family() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu family"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
