"""End to end: ``fastpref-train --loss dpo`` against TRL's ``DPOTrainer`` (issue 7).

Same work on both sides, one process each on the CPU, float32:

- the same small Llama (``_common.LLAMA``: hidden 256, 4 layers; the vocabulary is swept), built
  once per vocabulary with a fixed seed and saved, then loaded from that directory by both;
- the same rows of the bundled preference data (``default_data("pair_rationale")`` read as plain
  ``pair`` rows), tokenised once by ``fastpref.data.tokenize_rows`` with the bundled tokenizer;
  TRL is handed exactly those token ids (its own tokenisation is skipped, see ``_trl_worker``),
  in the order ``fastpref-train`` visits them, so step i is the same batch in both;
- micro-batch 8 pairs, no truncation (``max_length`` above the longest example), DPO sigmoid with
  beta = 0.1, AdamW, constant lr, clipping at 1.0, no evaluation in TRL (fastpref-train insists
  on a held-out split: it gets a one-example file, evaluated outside the timed steps);
- reference log-probs: TRL's default, a reference forward inside every step; fastpref-train's
  default, one precompute over the training examples before the loop, into a fresh (cold)
  cache directory. Every example passes through the reference once in both. The precompute is
  counted in full: its time is added to the timed steps in proportion to the examples they hold.

Per run: steady step time (mean over the timed steps after ``WARMUP`` steps), completion
tokens/s (chosen + rejected completion tokens, EOS included, over the timed steps), and the
worker's peak resident set (VmHWM). Agreement, asserted here: the step-0 loss is ln 2 within
1e-4 in both, and TRL's per-sequence log-probs of the first batch (its collator and fused LM
head) equal fastpref's (``fastpref.data.collate`` + ``fastpref.models.PolicyLogps``) within 1e-4.

    flock /tmp/fastpref-bench.lock pytest bench/bench_train.py
    FASTPREF_BENCH_QUICK=1 pytest bench/bench_train.py    # tiny model, 2 steps: smoke test
    FASTPREF_BENCH_LONG=1 pytest bench/bench_train.py     # ~160-token sequences, V=32000
    FASTPREF_BENCH_BF16=1 pytest bench/bench_train.py     # both in bf16 (results *_bf16.*)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
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
)

BETA = 0.1
LR = 1e-6
SEED = 0
if QUICK:
    VOCABS, HEADLINE_VOCAB, MICRO_BATCH, WARMUP, TIMED = (2048,), 2048, 2, 1, 1
else:
    VOCABS, HEADLINE_VOCAB, MICRO_BATCH, WARMUP, TIMED = (8000, 32000, 128256), 32000, 8, 1, 5
# FASTPREF_BENCH_LONG=1: the scale of the TRL figures (8 pairs of ~160 tokens), at the
# headline vocabulary only. Each example joins JOIN consecutive bundled rows field by field
# (prompts with prompts, chosen with chosen, rejected with rejected): the same text, 5x longer.
LONG = os.environ.get("FASTPREF_BENCH_LONG") == "1"
JOIN = 5
if LONG:
    VOCABS = (HEADLINE_VOCAB,)
STEPS = WARMUP + TIMED
LOGP_ATOL = 1e-4  # the tolerance, for sums of ~24 token log-probs (|Σ log p| < 400)
# With FASTPREF_BENCH_LONG the sums reach ~1700 in magnitude, where one float32 ulp is 1.2e-4
# (TRL itself is 1.2e-4 off a plain HF forward there): there the check is relative.
LOGP_RTOL = 1e-6
LN2_ATOL = 1e-4

# (vocabulary, run). The two extra runs at the headline vocabulary show what each side's other
# reference setting costs: TRL with its default gradient checkpointing (recomputes activations
# in backward: less memory, more time), and fastpref-train --ref-in-pass.
RUNS = [(v, r) for v in VOCABS for r in ("trl", "fastpref")] + (
    [] if LONG else [(HEADLINE_VOCAB, "trl_gradient_checkpointing"),
                     (HEADLINE_VOCAB, "fastpref_ref_in_pass")]
)  # fmt: skip
RESULTS: dict[tuple[int, str], dict] = {}

# FASTPREF_BENCH_THREADS=N: intra-op threads of both trainers (default: torch's, one per core).
# With other work on the shared cores, 2-thread OpenMP regions wait at barriers for a descheduled
# thread; 1 thread makes both sides' CPU time a clean measure of their work.
THREADS = os.environ.get("FASTPREF_BENCH_THREADS")
# FASTPREF_BENCH_BF16=1: both trainers in bf16 (issue 18): TRL's ``bf16=True`` (the Trainer's CPU
# autocast over fp32 weights) against ``fastpref-train --bf16`` (bf16 weights and activations,
# DeepSpeed's fp32 master weights, fp32 accumulation in the fused ops). Headline runs only.
BF16 = os.environ.get("FASTPREF_BENCH_BF16") == "1"
if BF16:
    RUNS = [(v, r) for v in VOCABS for r in ("trl", "fastpref")]
SUFFIX = (
    (f"_{THREADS}thread" if THREADS else "") + ("_long" if LONG else "") + ("_bf16" if BF16 else "")
)

TRAIN_ENV = {
    **OFFLINE_ENV,
    "HF_DATASETS_OFFLINE": "1",
    "FASTPREF_BENCH_QUICK": "1" if QUICK else "0",
    **({"OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS} if THREADS else {}),
}


@dataclass
class Data:
    train_file: Path  # rows (text) given to fastpref-train --data
    eval_file: Path  # one held-out row for fastpref-train --eval-split
    trl_file: Path  # the same examples as token ids, in fastpref-train's order, for TRL
    examples: list[dict]  # tokenised examples in training order
    trl_examples: list[dict]  # {"prompt_ids", "chosen_ids", "rejected_ids"} in training order
    tokenizer_dir: Path
    pad_id: int
    max_length: int


def _training_order(n: int) -> list[int]:
    """The order fastpref-train visits n examples in (one epoch), so TRL can use it too."""
    try:
        from fastpref.train.loop import _stream_indices
    except ImportError:  # the trainer changed how it orders data: fall back to file order
        return list(range(n))
    return _stream_indices(n, SEED, 0, n)


def _to_trl(example: dict) -> dict:
    (chosen, rejected), (p_c, p_r) = example["input_ids"], example["prompt_lengths"]
    assert p_c == p_r and chosen[:p_c] == rejected[:p_r], "roles of a pair share the prompt"
    return {"prompt_ids": chosen[:p_c], "chosen_ids": chosen[p_c:], "rejected_ids": rejected[p_r:]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_train")


@pytest.fixture(scope="module")
def data(workdir: Path) -> Data:
    from transformers import AutoTokenizer

    from fastpref.families.lm_formats import default_data, load_rows, tokenize_rows
    from fastpref.paths import bundled_tokenizer_path

    tokenizer_dir = bundled_tokenizer_path()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    n = STEPS * MICRO_BATCH
    rows = load_rows(str(default_data("pair_rationale")), "pair")
    if LONG:
        fields = ("prompt", "chosen", "rejected")
        rows = [
            {k: " ".join(r[k] for r in rows[i : i + JOIN]) for k in fields}
            for i in range(0, (n + 1) * JOIN, JOIN)
        ]
    rows = rows[: n + 1]
    train_rows, eval_rows = rows[:n], rows[n:]
    # No truncation on either side: max_length is the longest tokenised example.
    untruncated = tokenize_rows(train_rows, "pair", tok, max_length=10**6)
    max_length = max(len(ids) for ex in untruncated for ids in ex["input_ids"])
    examples = tokenize_rows(train_rows, "pair", tok, max_length=max_length)
    assert [ex["input_ids"] for ex in examples] == [ex["input_ids"] for ex in untruncated]

    order = _training_order(len(examples))
    examples = [examples[i] for i in order]
    trl_examples = [_to_trl(ex) for ex in examples]
    paths = {k: workdir / f"{k}.jsonl" for k in ("train", "eval", "trl")}
    for key, items in (("train", train_rows), ("eval", eval_rows), ("trl", trl_examples)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in items))
    return Data(
        paths["train"], paths["eval"], paths["trl"], examples, trl_examples,
        tokenizer_dir, tok.pad_token_id, max_length,
    )  # fmt: skip


_MODELS: dict[int, Path] = {}


def model_dir(workdir: Path, data: Data, vocab: int) -> Path:
    if vocab not in _MODELS:
        _MODELS[vocab] = build_llama(
            workdir / f"llama_v{vocab}", vocab, data.tokenizer_dir, quick=QUICK, seed=SEED
        )
    return _MODELS[vocab]


def completion_tokens(trl_examples: list[dict]) -> list[int]:
    """Completion tokens (chosen + rejected, EOS included) of each step's micro-batch."""
    per_example = [len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in trl_examples]
    return [sum(per_example[i : i + MICRO_BATCH]) for i in range(0, len(per_example), MICRO_BATCH)]


# -- agreement of the per-sequence log-probs ----------------------------------------------------


def test_logprobs_agree_with_trl(workdir: Path, data: Data) -> None:
    """TRL's and fastpref's Σ log p of the first batch, same model, same token ids.

    TRL: its ``DataCollatorForPreference`` ([chosen; rejected] rows, right padding, completion
    mask) and its fused LM head (``add_fused_lm_head``, as DPOTrainer installs it), summed the
    way ``DPOTrainer._compute_loss`` sums. fastpref: ``collate`` (role-major rows, labels aligned
    with the hidden states) and ``PolicyLogps`` (backbone -> ``sequence_logprobs``), the code
    fastpref-train runs. Both are also checked against a plain HF forward (full logits).
    """
    from transformers import AutoModelForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from fastpref.families.lm_formats import collate
    from fastpref.models import PolicyLogps

    batch_ex, trl_ex = data.examples[:MICRO_BATCH], data.trl_examples[:MICRO_BATCH]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir(workdir, data, HEADLINE_VOCAB), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()

    fp = collate(batch_ex, "pair", data.pad_id)
    tb = DataCollatorForPreference(pad_token_id=data.pad_id, max_length=data.max_length)(trl_ex)
    # Same rows, same ids: row i of both is (chosen 0..B-1, rejected 0..B-1).
    L = tb["input_ids"].shape[1]
    assert torch.equal(fp["input_ids"][:, :L] * fp["attention_mask"][:, :L],
                       tb["input_ids"] * tb["attention_mask"])  # fmt: skip
    assert torch.equal(fp["attention_mask"][:, :L], tb["attention_mask"])
    trl_labels = tb["input_ids"].masked_fill(tb["completion_mask"] == 0, -100)
    assert torch.equal(fp["labels"][:, : L - 1], trl_labels[:, 1:])  # same scored positions

    with torch.no_grad():
        ours, _ = PolicyLogps(model)(fp["input_ids"], fp["attention_mask"], fp["labels"])
        logits = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"]).logits
        logp = logits[:, :-1].float().log_softmax(-1)
        mask = trl_labels[:, 1:] != -100
        tok = logp.gather(-1, trl_labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        plain = (tok * mask).sum(-1)
        add_fused_lm_head(model)
        out = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
                    labels=trl_labels, fused_lm_head=True, use_cache=False)  # fmt: skip
        theirs = out.log_probs.sum(dim=1)

    errs = {
        "fastpref_vs_trl": (ours - theirs).abs().max().item(),
        "fastpref_vs_plain_hf": (ours - plain).abs().max().item(),
        "trl_vs_plain_hf": (theirs - plain).abs().max().item(),
    }
    RESULTS[("agreement", "logps")] = {
        **errs,
        "sequences": int(ours.numel()),
        "logps_range": (ours.min().item(), ours.max().item()),
        "vocab": HEADLINE_VOCAB,
    }
    tol = LOGP_RTOL * float(theirs.abs().max()) if LONG else LOGP_ATOL
    RESULTS[("agreement", "logps")]["tolerance"] = tol
    assert errs["fastpref_vs_trl"] <= tol, errs
    assert errs["fastpref_vs_plain_hf"] <= tol, errs


# -- the runs -----------------------------------------------------------------------------------


def run_trl(workdir: Path, data: Data, vocab: int, *, gradient_checkpointing: bool) -> dict:
    tag = f"trl_v{vocab}{'_gc' if gradient_checkpointing else ''}"
    out = workdir / f"{tag}.json"
    cmd = python_worker(
        "_trl_worker.py",
        "--model", str(model_dir(workdir, data, vocab)),
        "--examples", str(data.trl_file),
        "--out", str(out),
        "--output-dir", str(workdir / tag),
        "--micro-batch", str(MICRO_BATCH),
        "--max-length", str(data.max_length),
        "--beta", str(BETA),
        "--lr", str(LR),
        "--seed", str(SEED),
        *(["--gradient-checkpointing"] if gradient_checkpointing else []),
        *(["--bf16"] if BF16 else []),
    )  # fmt: skip
    child = run_child(cmd, env=TRAIN_ENV, timeout=3600).check()
    r = json.loads(out.read_text())
    tokens = completion_tokens(data.trl_examples)
    assert r["steps"] == STEPS == len(r["step_s"])
    return {
        "step_s": r["step_s"],
        "step_cpu_s": r["step_cpu_s"],
        "step_tokens": tokens,
        "precompute_s": 0.0,  # the reference forward is inside every step
        "precompute_cpu_s": 0.0,
        "step0_loss": r["losses"][0],
        "step0_logps_chosen": r["logs"][0].get("logps/chosen"),
        "peak_rss_mb": r["peak_rss_mb"],
        "process_wall_s": child.wall_s,
        "torch_threads": r["torch_threads"],
        "version": f"trl {r['trl_version']}",
    }


def run_fastpref(workdir: Path, data: Data, vocab: int, *, ref_in_pass: bool) -> dict:
    tag = f"fastpref_v{vocab}{'_inpass' if ref_in_pass else ''}"
    out_dir, cache = workdir / tag, workdir / f"{tag}_cache"
    shutil.rmtree(cache, ignore_errors=True)  # cold cache: the precompute always runs
    out = workdir / f"{tag}.json"
    cmd = python_worker(
        "_fastpref_worker.py", str(out), "--",
        "--loss", "dpo",
        "--model", str(model_dir(workdir, data, vocab)),
        "--data", str(data.train_file),
        "--eval-split", str(data.eval_file),
        "--eval-every", str(10**6),
        "--output-dir", str(out_dir),
        "--cache-dir", str(cache),
        "--micro-batch", str(MICRO_BATCH),
        "--max-length", str(data.max_length),
        "--max-steps", str(STEPS),
        "--beta", str(BETA),
        "--lr", str(LR),
        "--scheduler", "constant",
        "--warmup-ratio", "0",
        "--max-grad-norm", "1.0",
        "--seed", str(SEED),
        "--no-progress",
        *(["--ref-in-pass"] if ref_in_pass else []),
        *(["--bf16"] if BF16 else []),
    )  # fmt: skip
    child = run_child(cmd, env=TRAIN_ENV, timeout=3600).check()
    r = json.loads(out.read_text())
    records = [
        json.loads(line)
        for line in (out_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    steps = [rec for rec in records if "tokens/s" in rec]
    assert len(steps) == STEPS, f"expected {STEPS} step records, got {len(steps)}"
    if r["precompute_s"] is None or "log_marks_error" in r:
        raise RuntimeError(f"the worker could not observe the run: {r}")
    # A step is the interval between its record and the previous one (the first step's
    # previous record is the held-out evaluation just before the loop).
    marks = r["log_marks"]
    first = next(i for i, m in enumerate(marks) if m["train"])
    window = marks[first - 1 : first + STEPS]
    assert all(m["train"] for m in window[1:]), "an evaluation inside the timed steps"
    return {
        "step_s": [b["wall"] - a["wall"] for a, b in zip(window, window[1:], strict=False)],
        "step_cpu_s": [b["cpu"] - a["cpu"] for a, b in zip(window, window[1:], strict=False)],
        "step_s_logged": [rec["tokens"] / rec["tokens/s"] for rec in steps],
        "step_tokens": [rec["tokens"] for rec in steps],
        "precompute_s": 0.0 if ref_in_pass else sum(r["precompute_s"]),
        "precompute_cpu_s": 0.0 if ref_in_pass else sum(r["precompute_cpu_s"]),
        "step0_loss": steps[0]["loss"],
        "step0_logps_chosen": steps[0].get("logps/chosen"),
        "peak_rss_mb": r["peak_rss_mb"],
        "process_wall_s": child.wall_s,
        "torch_threads": r["torch_threads"],
        "version": "fastpref-train",
    }


def summarise(r: dict) -> dict:
    """Steady-state numbers over the timed steps, with the precompute counted in full.

    The precompute scores every training example once; the timed steps are charged their share
    of it (timed steps / all steps). CPU seconds (all threads of the process) are reported next
    to wall seconds because the 2 cores are shared: wall time moves with the load of others,
    CPU time much less.
    """
    n = len(r["step_s"])
    timed_tok = sum(r["step_tokens"][WARMUP:])
    out = {"tokens_per_step": timed_tok / TIMED}
    for clock, suffix in (("step_s", ""), ("step_cpu_s", "_cpu")):
        timed = sum(r[clock][WARMUP:])
        share = r[f"precompute{suffix}_s"] * TIMED / n
        out[f"step{suffix}_s"] = (timed + share) / TIMED
        out[f"step{suffix}_s_without_ref_pass"] = timed / TIMED
        out[f"tokens_per{suffix}_s"] = timed_tok / (timed + share)
        out[f"precompute{suffix}_s"] = r[f"precompute{suffix}_s"]
    out["peak_rss_mb"] = r["peak_rss_mb"]
    return out


@pytest.mark.parametrize(("vocab", "run"), RUNS, ids=[f"{v}-{r}" for v, r in RUNS])
def test_train(benchmark, workdir: Path, data: Data, vocab: int, run: str) -> None:
    model_dir(workdir, data, vocab)  # built outside the timed call
    if run.startswith("trl"):
        kw = {"gradient_checkpointing": run == "trl_gradient_checkpointing"}
        fn = lambda: run_trl(workdir, data, vocab, **kw)  # noqa: E731
    else:
        kw = {"ref_in_pass": run == "fastpref_ref_in_pass"}
        fn = lambda: run_fastpref(workdir, data, vocab, **kw)  # noqa: E731
    benchmark.group = f"train V={vocab}"
    load_before = loadavg()
    r = benchmark.pedantic(fn, rounds=1, iterations=1)  # times the whole process
    r["loadavg"] = (load_before, loadavg())
    r["summary"] = summarise(r)
    RESULTS[(vocab, run)] = r
    benchmark.extra_info.update(
        run=run, vocab=vocab, micro_batch=MICRO_BATCH, max_length=data.max_length,
        warmup_steps=WARMUP, timed_steps=TIMED, **r["summary"],
        step0_loss=r["step0_loss"], loadavg=r["loadavg"], hardware=hardware(),
    )  # fmt: skip
    assert abs(r["step0_loss"] - math.log(2)) <= LN2_ATOL, (run, r["step0_loss"])


# -- report: table + plot -----------------------------------------------------------------------


def _out_dir(workdir: Path) -> Path:
    return workdir if QUICK else BENCH_DIR / "results"


def test_report(workdir: Path, data: Data) -> None:
    """The table for bench/README.md, the sweep plot and the raw numbers (JSON)."""
    missing = [key for key in RUNS if key not in RESULTS]
    if missing:
        pytest.skip(f"runs missing (deselected or failed): {missing}")
    rows = []
    for vocab, run in RUNS:
        s = RESULTS[(vocab, run)]["summary"]
        base = RESULTS[(vocab, "trl")]["summary"]
        rows.append(
            f"| {vocab} | {run} | {s['step_s']:.2f} | {s['tokens_per_s']:.0f} | "
            f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}x | {s['step_cpu_s']:.2f} | "
            f"{s['tokens_per_cpu_s']:.0f} | "
            f"{s['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x | "
            f"{s['precompute_s']:.2f} | {s['peak_rss_mb']:.0f} | "
            f"{s['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | "
            f"{RESULTS[(vocab, run)]['step0_loss']:.6f} |"
        )
    table = "\n".join([
        "| vocab | run | step (s) | completion tok/s | vs TRL | step (CPU s) | tok per CPU s | "
        "vs TRL | ref precompute (s) | peak RSS (MB) | vs TRL | step-0 loss |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])  # fmt: skip
    agreement = RESULTS.get(("agreement", "logps"))
    out = _out_dir(workdir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "hardware": hardware(),
        "worker_threads": {f"{v}-{r}": RESULTS[(v, r)]["torch_threads"] for v, r in RUNS},
        "micro_batch_pairs": MICRO_BATCH,
        "max_length": data.max_length,
        "warmup_steps": WARMUP,
        "timed_steps": TIMED,
        "tokens_per_step_mean": sum(completion_tokens(data.trl_examples)) / STEPS,
        "agreement": agreement,
        # logged mean Σ log p of the chosen completions in step 0 (the same batch in every run)
        "step0_logps_chosen": {f"{v}-{r}": RESULTS[(v, r)]["step0_logps_chosen"] for v, r in RUNS},
        "versions": {k[1]: RESULTS[k]["version"] for k in RUNS},
    }
    (out / f"train_sweep{SUFFIX}.md").write_text(table + "\n")
    (out / f"train_sweep{SUFFIX}.json").write_text(json.dumps(
        {"meta": meta, "runs": {f"{v}-{r}": RESULTS[(v, r)] for v, r in RUNS}},
        indent=2, default=str,
    ))  # fmt: skip
    if len(VOCABS) > 1:  # a sweep to plot
        png = f"train_vocab_sweep{SUFFIX}.png"
        plot_sweep(out / png if QUICK else BENCH_DIR / png)
    print("\n" + table)
    print(json.dumps(meta, indent=2, default=str))


def plot_sweep(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_c, ax_m) = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        (ax_t, "tokens_per_s", 1, "throughput (wall clock)", "completion tokens / s"),
        (ax_c, "tokens_per_cpu_s", 1, "throughput per CPU second", "completion tokens / CPU s"),
        (ax_m, "peak_rss_mb", 1 / 1024, "peak resident memory", "GiB"),
    )
    curves = (("trl", "o-", "TRL DPOTrainer"), ("fastpref", "s-", "fastpref-train"))
    for ax, key, scale, title, unit in panels:
        for run, style, label in curves:
            ax.plot(VOCABS, [RESULTS[(v, run)]["summary"][key] * scale for v in VOCABS], style,
                    label=label)  # fmt: skip
        for v in VOCABS:
            ours, theirs = (RESULTS[(v, run)]["summary"][key] for run in ("fastpref", "trl"))
            ax.annotate(f"{ours / theirs:.2f}x", (v, ours * scale), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(list(VOCABS), [f"{v // 1000}k" for v in VOCABS])
        ax.set_xlabel("vocabulary size")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"DPO step incl. reference pass, Llama hidden 256 x 4 layers, {MICRO_BATCH} pairs/step, "
        f"{'bfloat16' if BF16 else 'float32'}, {THREADS or hardware()['cores']} thread(s) on "
        f"{hardware()['cores']} shared cores (labels: fastpref / TRL)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
