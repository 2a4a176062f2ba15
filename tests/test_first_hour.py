"""What a TRL user meets in the first hour, one test per class of problem: every value checked
before anything is loaded (exit 2 naming the flag), TRL's data conventions, hub names, the
finished-run guard, resolved config values, ties counted alike in training and eval, the
reference-cache key, console wording.
"""

from __future__ import annotations

import json

import pytest

from fastpref.cli.train import main
from fastpref.families.lm_formats import load_rows
from fastpref.models import check_model_path
from fastpref.train import parse_config

pytestmark = pytest.mark.usefixtures("own_process_group")


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--beta", "-1"], "--beta must be a finite number > 0, got -1.0"),
        (["--beta", "0"], "--beta must be a finite number > 0, got 0.0"),
        (["--loss", "cdpo", "--label-smoothing", "0.9"], "--label-smoothing must lie in [0, 0.5)"),
        (["--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["--max-length", "1"], "--max-length must be >= 2, got 1"),
        (["--max-steps", "-5"], "--max-steps must be >= 1, got -5"),
        (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (["--epochs", "0"], "--epochs must be > 0, got 0.0"),
        (["--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1), got 2.0"),
        (["--eval-fraction", "1"], "--eval-fraction must be in (0, 1), got 1.0"),
        (["--micro-batch", "0"], "--micro-batch must be >= 1, got 0"),
    ],
)
def test_bad_values_exit_2_before_anything_is_touched(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    err = _err(capsys, ["--loss", "dpo", *flags, "--output-dir", str(out)])
    assert err.startswith("fastpref-train: error: ") and message in err, err
    assert not out.exists()


def test_bad_values_in_a_config_file_are_checked_too(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("loss: dpo\nbeta: -2\n")
    assert "--beta must be a finite number > 0" in _err(capsys, ["--config", str(path)])


def test_columns_naming_no_field_is_an_error(assets, tmp_path, capsys):
    argv = ["--loss", "dpo", "--data", str(assets / "pair.jsonl"), "--columns", "prompt=q,foo=id"]
    err = _err(capsys, argv + ["--output-dir", str(tmp_path / "r")])
    assert "--columns names 'foo', not a field of format 'pair'" in err, err
    assert "prompt, chosen, rejected, margin" in err


def test_file_matching_no_format_lists_its_columns_and_a_mapping(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(ValueError) as e:
        load_rows(str(path), "pair")
    text = str(e.value)
    assert "its columns (question, good, bad) match no field of format 'pair'" in text
    assert "--columns prompt=question,chosen=good,rejected=bad" in text


def test_trl_implicit_prompt_pairs_are_read_as_trl_does(tmp_path):
    """Full conversations in chosen/rejected, no prompt: the shared leading messages are the
    prompt, the last assistant message of each its completion."""
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    row = {
        "chosen": [*user, {"role": "assistant", "content": "4"}],
        "rejected": [*user, {"role": "assistant", "content": "5"}],
    }
    path = tmp_path / "implicit.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (got,) = load_rows(str(path), "pair")
    assert got == {"prompt": user, "chosen": "4", "rejected": "5"}
    row["rejected"] = [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="share no leading messages"):
        load_rows(str(path), "pair")


def test_hub_names_without_an_organisation_are_hub_names(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    check_model_path("gpt2")  # tried as a hub name, not refused as a missing path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_path(str(tmp_path / "gpt2"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _err(capsys, ["--loss", "sft", "--model", "gpt2", "--output-dir", str(tmp_path / "o")])
    assert "--model 'gpt2' is not a local path and the hub is unreachable" in err, err
    assert "--tokenizer" not in err and "Traceback" not in err


def test_trl_dataset_spellings(tmp_path, capsys):
    cfg = parse_config(["--dataset-name", "org/prefs", "--dataset-split", "test"])
    assert cfg.data == "org/prefs:test"
    assert parse_config(["--dataset-name", "org/prefs"]).data == "org/prefs"
    assert "give the data once" in _err(capsys, ["--data", "a.jsonl", "--dataset-name", "b"])


def test_help_ends_with_columns_and_examples(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    tail = text[text.index("data columns each --loss reads") :]
    assert "dpo" in tail and "prompt, chosen, rejected" in tail and "kto" in tail
    assert tail.count("fastpref-train --loss") + tail.count("-m fastpref.cli.train") >= 3
    assert "NAME:SPLIT" in text


def _tiny_run(assets, tmp_path, loss, *extra, steps=1):
    fmt = {"dpo": "pair", "sft": "sft", "kto": "kto"}[loss]
    return [
        "--loss", loss, "--model", str(assets / "model"), "--data", str(assets / f"{fmt}.jsonl"),
        "--max-length", "48", "--micro-batch", "4", "--max-steps", str(steps), "--lr", "5e-3",
        "--eval-fraction", "0.25", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
        *extra,
    ]  # fmt: skip


def test_finished_run_is_never_silently_replaced(assets, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _tiny_run(assets, tmp_path, "dpo", "--output-dir", str(out))
    assert main(argv) == 0
    capsys.readouterr()
    before = (out / "metrics.jsonl").read_text()
    assert "holds a finished run (model, metrics.jsonl)" in _err(capsys, argv)
    assert (out / "metrics.jsonl").read_text() == before
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 5e-3 and config["model"] == str((assets / "model").resolve())
    assert config["output_dir"] == str(out.resolve())
    assert main(argv + ["--overwrite"]) == 0


def test_ties_count_half_in_training_and_eval_and_cache_key_sees_the_batch(assets, tmp_path):
    """Policy = reference at step 1: every pair is a tie, so the training accuracy (measured on
    the step's forward, before its update) and the held-out accuracy are both exactly ½. A run
    with another batch size must not reuse the first run's reference table (its batches round
    differently)."""
    out = tmp_path / "a"
    assert main(_tiny_run(assets, tmp_path, "dpo", "--output-dir", str(out))) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_acc = next(r["rewards/accuracies"] for r in records if "loss" in r)
    eval_acc = next(r["eval/accuracy"] for r in records if "eval/accuracy" in r)
    assert train_acc == 0.5 and eval_acc == 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference_cache_hit"] is False
    argv = _tiny_run(assets, tmp_path, "dpo", "--output-dir", str(tmp_path / "b"))
    argv[argv.index("--micro-batch") + 1] = "3"
    assert main(argv) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["reference_cache_hit"] is False


def test_sft_says_prompt_conditioning_accuracy(assets, tmp_path, capsys):
    assert main(_tiny_run(assets, tmp_path, "sft", "--output-dir", str(tmp_path / "s"))) == 0
    out = capsys.readouterr().out
    assert "held-out prompt-conditioning accuracy" in out and "preference accuracy" not in out


LABELS = [(True, True), (1, True), ("true", True), ("0", True), ("False", True), ("yes", False)]


@pytest.mark.parametrize(("label", "ok"), [*LABELS, (2, False)])
def test_kto_label_accepts_what_its_message_says(tmp_path, label, ok):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c", "label": label}) + "\n")
    if ok:
        assert isinstance(load_rows(str(path), "kto")[0]["label"], bool)
    else:
        with pytest.raises(ValueError, match="must be true/false or 1/0"):
            load_rows(str(path), "kto")


def test_losses_reachable_after_import_fastpref():
    import fastpref

    assert callable(fastpref.losses.dpo) and callable(fastpref.linear_logprobs)
