"""The loop fastpref-aepo serves, on the embedded defaults, each stage reading the previous
stage's files: --loss sft -> fastpref-sample -> --loss rm -> fastpref-aepo -> --loss dpo / lipo.
And the embedded default ``fastpref-aepo`` (bundled responses, bundled RM trained on first use)."""

import json

import pytest

from fastpref.cli.aepo import main as aepo
from fastpref.cli.sample import main as sample
from fastpref.cli.train import main as train

pytestmark = pytest.mark.slow


def _train(tmp_path, loss, *extra):
    out = tmp_path / loss
    argv = ["--loss", loss, "--output-dir", str(out), "--no-progress"]
    assert train([*argv, "--cache-dir", str(tmp_path / "cache"), *extra]) == 0
    assert (out / "model" / "config.json").is_file()
    return out / "model"


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_sample_rm_aepo_then_dpo_and_lipo(tmp_path, capsys):
    sft = _train(tmp_path, "sft")  # the bundled prompts/completions, the bundled tiny Llama
    sampled = tmp_path / "responses.jsonl"
    argv = ["--model", str(sft), "--num-prompts", "32", "--num-responses", "8"]
    argv += ["--max-new-tokens", "32", "-o", str(sampled), "--no-progress", "--device", "cpu"]
    assert sample(argv) == 0  # prompts of the bundled AEPO instructions
    assert all(len(r["responses"]) == 8 for r in _rows(sampled))
    rm = _train(tmp_path, "rm")  # the bundled preference pairs
    pairs, lists = tmp_path / "pairs.jsonl", tmp_path / "lists.jsonl"
    common = [str(sampled), "--num-responses", "8", "--reward-model", str(rm)]
    common += ["--skip-short-rows", "--no-progress", "--device", "cpu"]
    assert aepo([*common, "--num-annotations", "2", "-o", str(pairs)]) == 0
    assert aepo([*common, "--num-annotations", "4", "-o", str(lists)]) == 0
    printed = capsys.readouterr().out
    m = len(_rows(pairs))
    assert m >= 24, printed  # only rows with fewer than 8 distinct samples are skipped
    assert f"reward-model calls: {2 * m} (k*m = 2*{m}) against N*m = {8 * m}" in printed
    assert all(r["chosen_reward"] >= r["rejected_reward"] for r in _rows(pairs))
    assert all(len(r["responses"]) == 4 for r in _rows(lists))
    for loss, data in (("dpo", pairs), ("lipo", lists)):
        _train(tmp_path, loss, "--model", str(sft), "--data", str(data), "--max-steps", "8")


def test_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert aepo(["--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "training the bundled tiny reward model" in printed
    assert "reward-model calls: 200 (k*m = 2*100) against N*m = 1600" in printed
    rows = _rows(tmp_path / "preference.jsonl")
    assert len(rows) == 100
    # quality as the bundled data is made: on topic (2) + polite (1); the RM ranks by it
    rude = ("Ugh", "What a dumb", "Whatever", "Stop bothering", "Figure it", "That is a stupid")
    rude += ("Go away", "Seriously")
    drift = ("Let's talk about", "Forget that,", "I would rather discuss", "Never mind that,")

    def quality(text):
        return 2 * (not any(d in text for d in drift)) + (not text.startswith(rude))

    better = sum(quality(r["chosen"]) > quality(r["rejected"]) for r in rows)
    worse = sum(quality(r["chosen"]) < quality(r["rejected"]) for r in rows)
    assert better >= 85 and worse <= 10, (better, worse)
    assert aepo(["--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0  # cached RM
    assert "training the bundled" not in capsys.readouterr().out
