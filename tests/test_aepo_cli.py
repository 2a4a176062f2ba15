"""fastpref-aepo and fastpref-sample end to end on tiny models: what is selected and scored, the
output formats (and that fastpref-train reads them), errors, and resume after a kill."""

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from _aepo_tiny import build_tiny_encoder, build_tiny_rm

from fastpref.cli.aepo import main as aepo
from fastpref.cli.sample import main as sample
from fastpref.data.aepo import select_subset, similarity_matrix
from fastpref.data.aepo_io import read_instructions
from fastpref.models.annotate import RewardAnnotator
from fastpref.models.encoder import Encoder
from fastpref.paths import bundled_data

N, M = 8, 12  # responses per instruction, instructions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("aepo")
    # the prompt column in the middle: it must not be taken as a response
    rows = [json.loads(x) for x in bundled_data("aepo_responses.jsonl").read_text().splitlines()]
    header = [*(f"r{i}" for i in range(4)), "prompt", *(f"r{i}" for i in range(4, N))]
    with (root / "responses.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows[:M]:
            w.writerow([*row["responses"][:4], row["prompt"], *row["responses"][4:N]])
    return {
        "data": str(root / "responses.csv"),
        "rm": str(build_tiny_rm(root / "rm")),
        "enc": str(build_tiny_encoder(root / "enc")),
    }


def _args(tiny, out, *extra):
    return [
        tiny["data"],
        "-o",
        str(out),
        "--reward-model",
        tiny["rm"],
        "--embedding-model",
        tiny["enc"],
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _expected_picks(tiny, k):
    data, _ = read_instructions(tiny["data"], N)
    enc = Encoder(tiny["enc"], device="cpu")
    picks = []
    for row in data.rows:
        sim = similarity_matrix(enc.encode(list(row.responses)).numpy())
        picks.append([row.responses[i] for i in select_subset(sim, k).indices])
    return data.rows, picks


def test_pairs_are_the_best_and_worst_of_the_selected_two(tiny, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert aepo(_args(tiny, out, "--num-responses", str(N), "--num-annotations", "2")) == 0
    printed = capsys.readouterr().out
    assert f"reward-model calls: {2 * M} (k*m = 2*{M}) against N*m = {N * M}" in printed
    rows = _rows(out)
    data, picks = _expected_picks(tiny, 2)
    rm = RewardAnnotator(tiny["rm"], device="cpu")
    for row, inst, pick in zip(rows, data, picks, strict=True):
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
        assert row["prompt"] == inst.prompt
        assert {row["chosen"], row["rejected"]} == set(pick)
        assert inst.prompt not in (row["chosen"], row["rejected"])
        scores = rm.score([inst.prompt] * 2, [row["chosen"], row["rejected"]])
        assert [row["chosen_reward"], row["rejected_reward"]] == pytest.approx(scores, abs=1e-5)
        assert row["chosen_reward"] >= row["rejected_reward"]


def test_ranked_lists_of_four_as_parquet(tiny, tmp_path, capsys):
    import pyarrow.parquet as pq

    out = tmp_path / "lists.parquet"
    # the seed tool's spellings
    assert aepo(_args(tiny, out, "--num_responses", str(N), "--num_annotations", "4")) == 0
    assert f"reward-model calls: {4 * M} " in capsys.readouterr().out
    rows = pq.read_table(out).to_pylist()
    _, picks = _expected_picks(tiny, 4)
    assert len(rows) == M
    for row, pick in zip(rows, picks, strict=True):
        assert set(row) == {"prompt", "responses", "scores"}
        assert sorted(row["responses"]) == sorted(pick)
        assert row["scores"] == sorted(row["scores"], reverse=True)


def test_west_of_n_scores_all_n(tiny, tmp_path, capsys):
    out = tmp_path / "won.csv"
    args = _args(tiny, out, "--num-responses", str(N), "--num-annotations", str(N), "--west_of_n")
    assert aepo(args) == 0
    assert f"reward-model calls: {N * M} " in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    data, _ = read_instructions(tiny["data"], N)
    rm = RewardAnnotator(tiny["rm"], device="cpu")
    for row, inst in zip(rows, data.rows, strict=True):
        scores = rm.score([inst.prompt] * N, list(inst.responses))
        assert row["chosen"] == inst.responses[int(np.argmax(scores))]
        assert row["rejected"] == inst.responses[int(np.argmin(scores))]


def test_exact_selection_runs_and_matches_on_these_rows(tiny, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert aepo(_args(tiny, a, "--num-annotations", "3", "--exact")) == 0
    assert aepo(_args(tiny, b, "--num-annotations", "3")) == 0
    assert _rows(a) == _rows(b)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-annotations", "1"], "--num-annotations must be at least 2"),
        (["--num-annotations", "9"], "--num-annotations 9 is more than --num-responses 8"),
        (["--west-of-n", "--num-annotations", "4"], "--west-of-n scores all --num-responses 8"),
        (["--num-responses", "9"], "responses.csv:2: 8 distinct non-empty responses, fewer"),
        (["-o", "x.txt"], "unsupported output type '.txt'"),
        (["--reward-model", "/nonexistent/rm"], "'/nonexistent/rm' does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_message(tiny, tmp_path, capsys, extra, message):
    assert aepo([*_args(tiny, tmp_path / "o.jsonl"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastpref-aepo: error: ") and message in err, err


_KILLED_IN_THIRD_WRITE = """
import json, os, signal, sys
import fastpref.cli.aepo as cli
from fastpref.data.aepo_io import PreferenceWriter
cli._CHUNK_TEXTS = 16  # two instructions per chunk at N = 8
append, writes = PreferenceWriter.append, []
def append_then_die(self, rows):
    writes.append(len(rows))
    if len(writes) < 3:
        return append(self, rows)
    text = "".join(json.dumps(r) + "\\n" for r in rows)
    with self.journal.open("a") as f:  # half a row of the third write lands, then the kill
        f.write(text[: text.index("\\n") // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
PreferenceWriter.append = append_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_resume_after_a_kill_mid_file(tiny, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_THIRD_WRITE, *_args(tiny, out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]
    journal = tmp_path / "pairs.jsonl.partial"
    assert not out.exists() and not journal.read_text().endswith("\n")  # cut mid-row
    before = journal.read_text().splitlines()[1:5]  # header, then the 4 finished rows
    assert aepo(_args(tiny, out)) == 0
    printed = capsys.readouterr().out
    assert "resuming after 4 finished rows" in printed
    assert f"reward-model calls: {2 * (M - 4)} (k*m = 2*{M - 4})" in printed
    assert out.read_text().splitlines()[:4] == before  # finished rows kept byte for byte
    assert not journal.exists()
    fresh = tmp_path / "fresh.jsonl"
    assert aepo(_args(tiny, fresh)) == 0
    for a, b in zip(_rows(out), _rows(fresh), strict=True):  # rewards: batches differ
        assert {k: v for k, v in a.items() if "reward" not in k} == {
            k: v for k, v in b.items() if "reward" not in k
        }
        assert a["chosen_reward"] == pytest.approx(b["chosen_reward"], abs=1e-5)
    assert aepo(_args(tiny, out)) == 0
    assert "exists and is complete; nothing to do" in capsys.readouterr().out


def _train(assets, tmp_path, loss, data):
    from fastpref.cli.train import main as train

    argv = ["--loss", loss, "--model", str(assets / "model"), "--data", str(data)]
    argv += ["--output-dir", str(tmp_path / loss), "--max-steps", "2", "--micro-batch", "4"]
    argv += ["--max-length", "96", "--eval-fraction", "0.25", "--no-progress"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    return train(argv)


def test_both_output_formats_train(tiny, tmp_path, assets):
    pairs, lists = tmp_path / "pairs.jsonl", tmp_path / "lists.csv"
    assert aepo(_args(tiny, pairs, "--num-annotations", "2")) == 0
    assert aepo(_args(tiny, lists, "--num-annotations", "4")) == 0
    assert _train(assets, tmp_path, "dpo", pairs) == 0
    assert (tmp_path / "dpo" / "model" / "config.json").is_file()
    assert _train(assets, tmp_path, "lipo", lists) == 0
    assert (tmp_path / "lipo" / "model" / "config.json").is_file()


def test_sample_writes_what_aepo_reads(tiny, tmp_path, assets, capsys):
    out = tmp_path / "sampled.jsonl"
    argv = ["--model", str(assets / "model"), "--data", tiny["data"], "--num-prompts", "3"]
    argv += ["--num-responses", "4", "--max-new-tokens", "8", "-o", str(out), "--no-progress"]
    assert sample([*argv, "--device", "cpu"]) == 0
    rows = _rows(out)
    assert [len(r["responses"]) for r in rows] == [4, 4, 4]
    data, _ = read_instructions(tiny["data"], N)
    assert [r["prompt"] for r in rows] == [inst.prompt for inst in data.rows[:3]]
    assert sample([*argv, "--temperature", "0"]) == 2
    assert "fastpref-sample: error: --temperature must be > 0" in capsys.readouterr().err
