"""Faults injected into a training run: a NaN loss (skipped, or stopping the run with nothing
saved after it), and untrusted files.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fastpref.cli.train import main
from fastpref.families.lm_preference import LMTask

pytestmark = pytest.mark.usefixtures("own_process_group")


def _argv(assets, tmp_path, *extra):
    return [
        "--loss", "dpo", "--model", str(assets / "model"), "--data", str(assets / "pair.jsonl"),
        "--max-length", "48", "--micro-batch", "4", "--max-steps", "4", "--lr", "5e-3",
        "--eval-fraction", "0.25", "--eval-every", "100", "--no-progress",
        "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run"), *extra,
    ]  # fmt: skip


@pytest.fixture
def nan_at_call(monkeypatch):
    """Make the training forward of the given calls (1-based) return a NaN loss."""
    poisoned: set[int] = set()
    calls = [0]
    original = LMTask.step

    def step(self, model, batch, split):
        result = original(self, model, batch, split)
        calls[0] += 1
        if calls[0] in poisoned:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(LMTask, "step", step)
    return poisoned


def test_nan_step_is_skipped_and_counted(assets, tmp_path, nan_at_call, capsys):
    nan_at_call.add(2)
    assert main(_argv(assets, tmp_path)) == 0
    out = tmp_path / "run"
    assert "step 2: non-finite loss or gradient norm; its update skipped" in capsys.readouterr().out
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r.get("skipped", False) for r in steps] == [False, True, False, False]
    assert json.loads((out / "summary.json").read_text())["non_finite_steps"] == 1
    weights = load_file(out / "model" / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert all(math.isfinite(r["loss"]) for r in steps if not r.get("skipped"))


def test_nan_policy_stop_saves_nothing_after_the_bad_step(assets, tmp_path, nan_at_call, capsys):
    nan_at_call.add(3)
    argv = _argv(assets, tmp_path, "--nan-policy", "stop", "--save-every", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "step 3: non-finite loss or gradient norm, --nan-policy stop" in err, err
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000002"
    assert not (ckpts / "step_000003").exists() and not (tmp_path / "run" / "model").exists()


def test_too_many_bad_steps_in_a_row_stop_the_run(assets, tmp_path, nan_at_call, capsys):
    nan_at_call.update({2, 3})
    assert main(_argv(assets, tmp_path, "--max-bad-steps", "2")) == 1
    assert "2 in a row (--max-bad-steps 2)" in capsys.readouterr().err
