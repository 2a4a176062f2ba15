"""``fastpref-train --loss rankllm`` and ``fastpref-rerank`` end to end, in this process, on the
tiny Llama of conftest (D=32, 2 layers, the bundled tokenizer) and a dozen lists of 4-7 short
passages: the three objectives (``ranking`` alone included), NEFTune, the eval metrics and the
saved model, bad input exiting 2 with file, entry and field, and reranking with FIRST scores and
by decoding.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from fastpref.cli.rerank import main as rerank_main
from fastpref.cli.train import main as train_main
from fastpref.train import parse_config, train

pytestmark = pytest.mark.usefixtures("own_process_group")

WORDS = ["cats", "dogs", "tea", "rain", "jazz", "chess", "maps", "bread"]


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = WORDS[i % len(WORDS)]
        k = rng.randint(4, 7)
        passages = [f"{topic} and {rng.choice(WORDS)}"] + [
            f"{rng.choice(WORDS)} or {rng.choice(WORDS)}" for _ in range(k - 1)
        ]
        relevance = [2] + [int(topic in p) for p in passages[1:]]
        order = list(range(k))
        rng.shuffle(order)
        rows.append(
            {
                "qid": f"q{i}",
                "query": f"about {topic}",
                "passages": [passages[j] for j in order],
                "relevance": [relevance[j] for j in order],
            }
        )
    return rows


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    root = tmp_path_factory.mktemp("lists")
    path = root / "lists.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(12)))
    return path


def _args(assets, lists, out, *extra, steps=2):
    return [
        "--loss",
        "rankllm",
        "--model",
        str(assets / "model"),
        "--data",
        str(lists),
        "--micro-batch",
        "2",
        "--max-steps",
        str(steps),
        "--lr",
        "5e-3",
        "--eval-fraction",
        "0.25",
        "--eval-every",
        "100",
        "--window",
        "5",
        "--stride",
        "3",
        "--no-progress",
        "--output-dir",
        str(out),
        *extra,
    ]


def _records(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval/loss" in r]


@pytest.fixture(scope="module")
def trained(assets, lists, tmp_path_factory):
    """One combined run (FIRST's weighted RankNet, NEFTune on), reused by the rerank tests."""
    out = tmp_path_factory.mktemp("runs") / "combined"
    argv = _args(assets, lists, out, "--weighted", "--neftune-alpha", "5")
    return out, train(parse_config(argv))


def test_combined_trains_and_reports_ranking_metrics(trained):
    out, summary = trained
    steps, evals = _records(out)
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("loss", "nll_loss", "rank_loss", "rewards/accuracies", "tokens/s"):
        assert all(math.isfinite(r[key]) for r in steps), key
    first = evals[0]
    for name in ("nDCG@10", "nDCG@5", "MRR@10"):
        assert 0 <= first[f"eval/first_stage/{name}"] <= 1
    assert 0 <= first["eval/nDCG@5"] <= 1 and first["eval/accuracy"] == summary["accuracy_before"]
    assert evals[-1]["eval/first_stage/nDCG@10"] == first["eval/first_stage/nDCG@10"]
    saved = json.loads((out / "model" / "rerank_config.json").read_text())
    assert saved["window"] == 5 and saved["identifiers"] == "alpha"
    assert (out / "model" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "objective", ["ranking", pytest.param("generation", marks=pytest.mark.slow)]
)
def test_ranking_alone_and_generation_alone_train(assets, lists, tmp_path, objective):
    """rank_llm's --objective ranking fails with a gather error; here it trains (the prompt
    and the target's "[" only, no LM term)."""
    out = tmp_path / objective
    summary = train(parse_config(_args(assets, lists, out, "--objective", objective, steps=1)))
    steps, evals = _records(out)
    assert math.isfinite(steps[0]["loss"]) and "eval/accuracy" in evals[-1]
    if objective == "ranking":
        assert "nll_loss" not in steps[0] and steps[0]["loss"] == steps[0]["rank_loss"]
    else:
        assert "rank_loss" not in steps[0] and steps[0]["loss"] == steps[0]["nll_loss"]
    assert 0 <= summary["accuracy_after"] <= 1


@pytest.mark.slow  # ~12 s: greedy decoding of every held-out window, before and after
def test_eval_by_decoding_reports_repairs(assets, lists, tmp_path, trained):
    """--decode: the held-out eval reranks by greedy decoding (the code fastpref-rerank --decode
    runs) and reports its repair counts beside nDCG@10, in metrics.jsonl and summary.json."""
    out = tmp_path / "decode"
    summary = train(parse_config(_args(assets, lists, out, "--decode", steps=1)))
    _, evals = _records(out)
    held_out = 3  # 25% of the 12 lists
    for record in (evals[0], evals[-1], summary["eval_after"]):
        windows = record["eval/decode/windows"]
        assert held_out <= windows <= 2 * held_out  # 4-7 passages: 1-2 windows of 5, stride 3
        assert 0 <= record["eval/decode/repaired"] <= windows
        assert record["eval/decode/missing"] >= 0 and 0 <= record["eval/accuracy"] <= 1
    saved = json.loads((out / "summary.json").read_text())
    after = summary["eval_after"]
    assert saved["eval_after"]["eval/decode/windows"] == after["eval/decode/windows"]
    assert "eval/decode/windows" not in _records(trained[0])[1][-1]  # FIRST: no decoding


def _cli_error(capsys, argv) -> str:
    assert train_main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_exits_2_naming_file_entry_and_field(assets, lists, tmp_path, capsys):
    base = _args(assets, lists, tmp_path / "bad")
    bad = tmp_path / "bad.jsonl"
    rows = _rows(3)
    rows[1] = {"conversations": [{"from": "human", "value": "[A] x\n[B] y"}]}
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = _cli_error(capsys, base + ["--data", str(bad)])
    assert f"{bad}: line 2: field 'conversations' has no assistant turn" in err, err
    array = tmp_path / "bad.json"
    array.write_text(json.dumps(rows[0]))
    assert "expected a JSON array of rows" in _cli_error(capsys, base + ["--data", str(array)])
    assert "--max-length does not apply" in _cli_error(capsys, base + ["--max-length", "64"])
    err = _cli_error(capsys, base + ["--ranking-loss", "listnet", "--weighted"])
    assert "applies to ranknet and lambda" in err
    err = _cli_error(capsys, base + ["--identifiers", "numeric", "--window", "12"])
    assert "identifier [10] is not a single token" in err


def test_rerank_first_and_decode(trained, lists, tmp_path, capsys):
    out, _ = trained
    run = tmp_path / "run.trec"
    argv = ["--model", str(out / "model"), "--data", str(lists), "--output", str(run)]
    assert rerank_main(argv + ["--first-stage-output", str(tmp_path / "first.trec")]) == 0
    text = capsys.readouterr().out
    assert "nDCG@10: first stage" in text and "windows/s" in text
    lines = run.read_text().splitlines()
    assert len(lines) == sum(len(r["passages"]) for r in _rows(12))
    qid, q0, _, rank, _, tag = lines[0].split()
    assert (qid, q0, rank, tag) == ("q0", "Q0", "1", "fastpref")
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in _rows(3)))
    argv = ["--model", str(out / "model"), "--data", str(few), "--output", str(run)]
    assert rerank_main(argv + ["--decode", "--top-k", "4"]) == 0  # a barely trained model's text
    text = capsys.readouterr().out
    assert "decoded windows" in text and "repaired" in text
