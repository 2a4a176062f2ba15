"""fastpref-aepo: selection time per instruction, and annotation cost of AEPO vs West-of-N vs all N.

1. Selection at N = 128, k = 2 and 4: the real all-MiniLM-L6-v2 embeds the 128 responses of one
   instruction (batch 64, mean pooling, L2 norm), then the cosine matrix and the default search
   (greedy from every start + 1-swap local search + 8 random restarts). pytest-benchmark times
   the whole, one instruction per round; the embedding and the search are also timed apart.
2. One file of m instructions x N = 128 responses through ``fastpref-aepo`` (in this process,
   the models loaded by each run) three ways: AEPO k = 2, West-of-N (all N scored, best and
   worst kept) and all N ranked (``--num-annotations N``). Reward-model calls and wall time of
   each, with two reward models: the bundled tiny one (2 x 128 Llama, trained on first use)
   and a random-weight Llama of a heavier shape (8 x 512), standing in for a costlier RM.

Data: the bundled AEPO responses regrouped: instruction i is the prompt of bundled row 8i with
the 128 responses of bundled rows 8i..8i+7 (16 each; all distinct).

    flock /tmp/fastpref-bench.lock pytest bench/bench_aepo.py -q -s
    FASTPREF_BENCH_QUICK=1 pytest bench/bench_aepo.py -q -s      # N = 32, smoke test

Results: bench/results/aepo.json and aepo.md (the hardware and load average with them).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path

import pytest
from _common import BENCH_DIR, QUICK, hardware, loadavg

from fastpref.cli.aepo import bundled_reward_model
from fastpref.cli.aepo import main as aepo
from fastpref.data.aepo import select_subset, similarity_matrix
from fastpref.models.encoder import Encoder
from fastpref.paths import bundled_data

N = 32 if QUICK else 128
GROUP = N // 16  # bundled rows per instruction
M = 2 if QUICK else 6  # instructions of the annotation comparison
RESULTS: dict = {"hardware": hardware(), "N": N, "selection": {}, "annotation": []}


def _instructions() -> list[dict]:
    rows = [json.loads(x) for x in bundled_data("aepo_responses.jsonl").read_text().splitlines()]
    return [
        {
            "prompt": rows[g * GROUP]["prompt"],
            "responses": [r for row in rows[g * GROUP : (g + 1) * GROUP] for r in row["responses"]],
        }
        for g in range(len(rows) // GROUP)
    ]


@pytest.fixture(scope="module")
def encoder():
    return Encoder(device="cpu")


@pytest.mark.parametrize("k", [2, 4])
def test_selection_per_instruction(benchmark, encoder, k):
    texts = _instructions()[0]["responses"]
    assert len(texts) == N
    split = {"embed": [], "select": []}

    def one():
        t = time.perf_counter()
        emb = encoder.encode(texts, batch_size=64).numpy()
        split["embed"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sel = select_subset(similarity_matrix(emb), k)
        split["select"].append(time.perf_counter() - t)
        return sel

    sel = benchmark.pedantic(one, rounds=3 if QUICK else 5, warmup_rounds=1)
    assert len(sel.indices) == k
    RESULTS["selection"][k] = {
        "total_s": benchmark.stats.stats.median,
        "embed_s": sorted(split["embed"])[len(split["embed"]) // 2],
        "select_s": sorted(split["select"])[len(split["select"]) // 2],
        "load": loadavg(),
    }


def _heavy_rm(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from fastpref.paths import bundled_tokenizer_path

    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _run(argv: list[str]) -> tuple[float, int, str]:
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        assert aepo(argv) == 0
    wall = time.perf_counter() - t
    calls = int(re.search(r"reward-model calls: (\d+)", out.getvalue()).group(1))
    return wall, calls, out.getvalue()


def test_annotation_cost_aepo_vs_west_of_n_vs_all(tmp_path):
    data = tmp_path / "responses.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _instructions()[:M]))
    rms = {"bundled tiny RM (2x128)": bundled_reward_model(progress=False)}
    rms["random Llama RM (8x512)"] = _heavy_rm(tmp_path / "heavy-rm")
    methods = {
        "AEPO k=2": ["--num-annotations", "2"],
        "AEPO k=4": ["--num-annotations", "4"],
        "West-of-N": ["--west-of-n"],
        "all N ranked": ["--num-annotations", str(N)],
    }
    for rm_name, rm in rms.items():
        for name, extra in methods.items():
            out = tmp_path / f"{len(RESULTS['annotation'])}.jsonl"
            argv = [str(data), "--num-responses", str(N), "--reward-model", str(rm), "-o", str(out)]
            wall, calls, printed = _run([*argv, *extra, "--no-progress", "--device", "cpu"])
            times = re.search(r"embed ([\d.]+) s, select ([\d.]+) s, annotate ([\d.]+) s", printed)
            RESULTS["annotation"].append(
                {
                    "reward_model": rm_name,
                    "method": name,
                    "calls": calls,
                    "wall_s": wall,
                    "embed_s": float(times.group(1)),
                    "select_s": float(times.group(2)),
                    "annotate_s": float(times.group(3)),
                    "load": loadavg(),
                }
            )
    _write()


def _write() -> None:
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    name = "aepo_quick" if QUICK else "aepo"
    (results / f"{name}.json").write_text(json.dumps(RESULTS, indent=2) + "\n")
    hw = RESULTS["hardware"]
    lines = [
        f"# fastpref-aepo, N = {N} ({hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, "
        f"{hw['torch_threads']} threads)",
        "",
        "Selection per instruction (MiniLM embedding of N responses + search), median:",
        "",
        "| k | total s | embed s | select s | load |",
        "|---|---|---|---|---|",
    ]
    for k, r in sorted(RESULTS["selection"].items()):
        lines.append(
            f"| {k} | {r['total_s']:.3f} | {r['embed_s']:.3f} | {r['select_s']:.4f} "
            f"| {r['load']:.1f} |"
        )
    lines += [
        "",
        f"Annotation of {M} instructions x {N} responses (one fastpref-aepo run each):",
        "",
        "| reward model | method | RM calls | wall s | embed s | select s | annotate s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS["annotation"]:
        lines.append(
            f"| {r['reward_model']} | {r['method']} | {r['calls']} | {r['wall_s']:.1f} "
            f"| {r['embed_s']:.1f} | {r['select_s']:.2f} | {r['annotate_s']:.1f} "
            f"| {r['load']:.1f} |"
        )
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
