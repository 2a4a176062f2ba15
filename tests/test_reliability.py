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


# --------------------------------------------------------------------------- untrusted files


def _tiny_checkpoint(assets, tmp_path, name):
    import shutil

    path = tmp_path / name
    shutil.copytree(assets / "model", path)
    return path


def test_model_with_custom_code_is_refused_without_trust(assets, tmp_path, capsys):
    path = _tiny_checkpoint(assets, tmp_path, "custom")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_evil.py").write_text("raise SystemExit('this code must never run')\n")
    argv = _argv(assets, tmp_path, "--model", str(path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ships its own model code (auto_map in config.json)" in err, err
    assert "--trust-remote-code" in err


def test_pickle_weights_are_refused_without_allow_pickle(assets, tmp_path, capsys):
    path = _tiny_checkpoint(assets, tmp_path, "pickled")
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(weights, path / "pytorch_model.bin")
    argv = _argv(assets, tmp_path, "--model", str(path), "--tokenizer", str(assets / "model"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has only pickle weights (pytorch_model.bin)" in err and "--allow-pickle" in err, err
    assert main(argv + ["--allow-pickle", "--max-steps", "1"]) == 0


def test_resume_never_follows_a_path_out_of_the_run(assets, tmp_path, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (ckpts / "latest").write_text("../../elsewhere")
    assert main(_argv(assets, tmp_path, "--resume")) == 2
    assert "not a checkpoint of this run" in capsys.readouterr().err


# --------------------------------------------------------------------------- concurrent runs

_HOLD_DIR = """
import sys, time
from fastpref.families.base import Dist
from fastpref.train.loop import _lock_run_dir
import pathlib, torch
_lock_run_dir(pathlib.Path(sys.argv[1]), Dist(torch.device("cpu")))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_live_runs_directory_is_refused(assets, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_DIR, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_argv(assets, tmp_path)) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by a live run (pid {holder.pid})" in err, err
    finally:
        holder.kill()
        holder.wait()
    assert main(_argv(assets, tmp_path, "--max-steps", "1")) == 0  # free once it is gone


_WRITE_TABLE = """
import sys, time, torch
from pathlib import Path
from fastpref.families.base import Dist
from fastpref.train.reference import load_or_compute

def compute():
    time.sleep(float(sys.argv[2]))  # both writers are inside compute at the same time
    return torch.arange(200_000, dtype=torch.float32).view(-1, 2)

table, hit = load_or_compute(Path(sys.argv[1]), "k", compute, dist=Dist(torch.device("cpu")))
print(hit, float(table.sum()), flush=True)
"""


def test_two_runs_racing_on_one_reference_cache_both_finish_with_the_whole_table(tmp_path):
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITE_TABLE, str(tmp_path), delay],
            stdout=subprocess.PIPE,
            text=True,
        )
        for delay in ("1.0", "1.0")
    ]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    expected = float(torch.arange(200_000, dtype=torch.float32).sum())
    assert all(p.returncode == 0 for p in procs)
    assert all(float(o[1]) == expected for o in outs)
    files = list((tmp_path / "ref_logps").iterdir())
    assert [f.name for f in files] == ["k.pt"]  # no temporary file left behind
    assert float(torch.load(files[0], weights_only=True).sum()) == expected
