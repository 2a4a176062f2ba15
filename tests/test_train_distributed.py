"""Runs that need fresh processes: two CPU ranks (torchrun, gloo, ZeRO-2 and ZeRO-3) against one
rank on the same global batch, and resume after a process is killed mid-run.

Same tiny Llama (D=32, untied lm_head so ZeRO-3's gathered lm_head gradient is checked on its own)
and 48-row data slice as test_train.py; each child process pins one thread so two ranks share
the 2 cores without oversubscription.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastpref.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow


_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env():
    """This process's environment without a process group's variables (an in-process training
    earlier in the session may have set them): each launched run makes its own."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def _args(assets, tmp_path, out, *extra, steps=6):
    return [
        "--loss",
        "dpo",
        "--model",
        str(assets / "model"),
        "--data",
        str(assets / "pair.jsonl"),
        "--max-length",
        "64",
        "--max-steps",
        str(steps),
        "--lr",
        "5e-3",
        "--eval-fraction",
        "0.25",
        "--eval-every",
        "100",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(tmp_path / out),
        *extra,
    ]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastpref.cli.train", *argv]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={_port()}",
            "-m",
            "fastpref.cli.train",
            *argv,
        ]
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _run(cmd, timeout=300) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end (however it ends), output and errors together."""
    return subprocess.run(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout,
    )  # fmt: skip


def _finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


ONE = ("--micro-batch", "2", "--grad-accum", "2")


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):
    """One rank, micro-batch 2 x 2 accumulation = the global batch of two ranks x micro-batch 2."""
    tmp = tmp_path_factory.mktemp("one")
    _finish(_launch(_args(assets, tmp, "run", *ONE)))
    return tmp / "run"


# stage 0: DeepSpeed all-reduces dense gradients and ClippedAdamW clips and steps on each rank,
# against one rank whose embedding gradient is row-sparse
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_processes_match_one_process(assets, tmp_path, one_process, stage):
    argv = _args(assets, tmp_path, "run", "--micro-batch", "2", "--zero-stage", str(stage))
    out = _finish(_launch(argv, nproc=2))
    assert "world=2" in out
    for a, b in zip(_steps(one_process), _steps(tmp_path / "run"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    w1 = load_file(one_process / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "run" / "model" / "model.safetensors")  # consolidated under ZeRO-3
    initial = load_file(assets / "model" / "model.safetensors")
    assert set(w1) == set(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=2e-5)
    # the lm_head weight only ever meets the fused op: its gradient reached the shards
    assert not torch.allclose(w2["lm_head.weight"], initial["lm_head.weight"])


# The killed run SIGKILLs itself the moment its step-3 record is written: after the step-2
# checkpoint, before the step-4 one. (A test that polled the log and then sent the signal raced
# the run: a fast machine finished all six steps and the last checkpoint before the kill landed.)
_KILLED_AT_STEP_3 = """
import os, signal, sys
from fastpref.cli.train import main
from fastpref.train.runlog import RunLog
write = RunLog.write
def write_then_die(self, record):
    write(self, record)
    if record.get("step") == 3:
        os.kill(os.getpid(), signal.SIGKILL)
RunLog.write = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_kill_reproduces_uninterrupted_losses(assets, tmp_path, one_process):
    steps = 6  # as one_process, which is the uninterrupted run (checkpointing changes nothing)
    argv = _args(assets, tmp_path, "killed", *ONE, "--save-every", "2")
    proc = _run([sys.executable, "-c", _KILLED_AT_STEP_3, *argv])
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-4000:]
    assert [r["step"] for r in _steps(tmp_path / "killed")] == [1, 2, 3]
    tag = latest_checkpoint(tmp_path / "killed" / "checkpoints")
    assert tag is not None
    killed_at = int(tag.split("_")[1])
    assert killed_at == 2
    out = _finish(_launch(argv + ["--resume"]))
    assert f"at step {killed_at}" in out
    expected = [(r["step"], r["loss"]) for r in _steps(one_process)]
    resumed = [(r["step"], r["loss"]) for r in _steps(tmp_path / "killed")]
    assert [s for s, _ in resumed] == list(range(1, steps + 1))
    for (s1, l1), (_, l2) in zip(expected, resumed, strict=True):
        assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6), s1


def test_latest_ignores_partial_and_missing_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_000002").mkdir(parents=True)
    (ckpt / "step_000004.partial").mkdir()
    assert latest_checkpoint(ckpt) is None  # no `latest` yet: nothing complete was recorded
    (ckpt / "latest").write_text("step_000002")
    assert latest_checkpoint(ckpt) == "step_000002"
    (ckpt / "latest").write_text("step_000006")  # names a directory that is gone
    assert latest_checkpoint(ckpt) is None


# Kill points inside a checkpoint write (the step-4 one of a save-every-2 run): after DeepSpeed
# wrote its files, before the partial directory is renamed, and between the rename and the new
# `latest`. Each run SIGKILLs itself there; the resumed run must start from step 2 (never from a
# partial step 4) and reproduce the uninterrupted losses.
_KILL_IN_CHECKPOINT = """
import os, signal, sys
point = sys.argv.pop(1)
import deepspeed
from fastpref.cli.train import main
import fastpref.train.checkpoint as ckpt

def die():
    os.kill(os.getpid(), signal.SIGKILL)

save = deepspeed.DeepSpeedEngine.save_checkpoint
def save_then_die(self, save_dir, tag=None, **kw):
    out = save(self, save_dir, tag=tag, **kw)
    if point == "after_deepspeed" and tag == "step_000004.partial":
        die()
    return out
deepspeed.DeepSpeedEngine.save_checkpoint = save_then_die

replace = os.replace
def replace_or_die(src, dst):
    src, dst = str(src), str(dst)
    if point == "before_rename" and src.endswith("step_000004.partial"):
        die()
    if point == "before_latest" and dst.endswith("latest") and os.path.isdir(
        os.path.join(os.path.dirname(dst), "step_000004")
    ):
        die()
    return replace(src, dst)
ckpt.os.replace = replace_or_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("point", ["after_deepspeed", "before_rename", "before_latest"])
def test_kill_inside_a_checkpoint_write_resumes_from_the_last_whole_one(
    assets, tmp_path, one_process, point
):
    argv = _args(assets, tmp_path, "killed", *ONE, "--save-every", "2")
    proc = _run([sys.executable, "-c", _KILL_IN_CHECKPOINT, point, *argv])
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-4000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert latest_checkpoint(ckpts) == "step_000002"
    out = _finish(_launch(argv + ["--resume"]))
    assert "at step 2" in out
    expected = [r["loss"] for r in _steps(one_process)]
    resumed = [r["loss"] for r in _steps(tmp_path / "killed")]
    assert resumed == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert latest_checkpoint(ckpts) == "step_000006" and not list(ckpts.glob("*.partial"))


# Kill points in the other two writes: the final save_pretrained (the model is written to
# model.partial and renamed, so a killed save never leaves a model/ that looks whole) and the
# reference-cache file (written to a temporary name and renamed: a killed write is recomputed).
_KILL_IN_WRITE = """
import os, signal, sys
point = sys.argv.pop(1)
import transformers, torch
import fastpref.train.reference as reference
from fastpref.cli.train import main

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "final_save":
    save = transformers.PreTrainedModel.save_pretrained
    def save_then_die(self, *a, **k):
        save(self, *a, **k)
        die()
    transformers.PreTrainedModel.save_pretrained = save_then_die
else:
    torch_save = torch.save
    def half_then_die(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"half a table")
        die()
    reference.torch.save = half_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("point", ["final_save", "reference_cache"])
def test_kill_inside_the_final_save_or_the_cache_write_leaves_nothing_half_written(
    assets, tmp_path, point
):
    argv = _args(assets, tmp_path, "killed", "--micro-batch", "4", "--save-every", "2", steps=2)
    proc = _run([sys.executable, "-c", _KILL_IN_WRITE, point, *argv])
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-4000:]
    run = tmp_path / "killed"
    assert not (run / "model").exists()
    if point == "reference_cache":  # only the temporary file, never a table under its key
        cache = tmp_path / "cache" / "ref_logps"
        assert list(cache.glob("*.tmp*")) and not list(cache.glob("*.pt"))
    rerun = argv + (["--resume"] if point == "final_save" else ["--overwrite"])
    out = _finish(_launch(rerun))
    assert (run / "model" / "model.safetensors").exists() and not (run / "model.partial").exists()
    if point == "reference_cache":
        assert "precomputed and cached" in out  # the half-written file was never trusted


# Disk full, as RLIMIT_FSIZE does it: once the step-2 checkpoint is whole, no file may grow past
# 64 KiB (SIGXFSZ ignored, so a write fails with EFBIG as on a full disk). The step-4 checkpoint
# cannot be written: the run stops with exit 1 and a message naming the path, and the step-2
# checkpoint and the metrics written so far are intact.
_FULL_DISK_AFTER_STEP_2 = """
import resource, signal, sys
import fastpref.train.loop as loop
from fastpref.cli.train import main
save = loop.save_checkpoint
def save_then_fill(engine, ckpt_dir, step, *a, **k):
    tag = save(engine, ckpt_dir, step, *a, **k)
    if step == 2:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    return tag
loop.save_checkpoint = save_then_fill
sys.exit(main(sys.argv[1:]))
"""


def test_full_disk_stops_with_the_path_and_keeps_what_was_whole(assets, tmp_path):
    argv = _args(assets, tmp_path, "full", "--micro-batch", "4", "--save-every", "2")
    proc = _run([sys.executable, "-c", _FULL_DISK_AFTER_STEP_2, *argv])
    assert proc.returncode == 1, proc.stdout[-4000:]
    ckpts = tmp_path / "full" / "checkpoints"
    assert f"writing checkpoint {ckpts / 'step_000004.partial'} failed" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert latest_checkpoint(ckpts) == "step_000002" and not list(ckpts.glob("*.partial"))
    assert [r["step"] for r in _steps(tmp_path / "full")] == [1, 2, 3, 4]  # whole lines only
    resumed = _finish(_launch(argv + ["--resume"]))
    assert "at step 2" in resumed


# A rank that fails mid-step: the job ends non-zero with that rank's error (torchrun stops the
# other rank, which would otherwise wait in the next all-reduce), well within the timeout.
_RANK_1_FAILS = """
import os, sys
from fastpref.families.lm_preference import LMTask
from fastpref.cli.train import main
step = LMTask.step
calls = [0]
def fail_on_rank_1(self, *a, **k):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:
        raise RuntimeError("injected failure on rank 1 at its second micro-step")
    return step(self, *a, **k)
LMTask.step = fail_on_rank_1
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_ends_the_job_with_its_error(assets, tmp_path):
    script = tmp_path / "fail_rank_1.py"
    script.write_text(_RANK_1_FAILS)
    argv = _args(assets, tmp_path, "failing", "--micro-batch", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    proc = _run([*cmd, f"--master_port={_port()}", str(script), *argv], timeout=240)
    assert proc.returncode != 0
    assert "injected failure on rank 1 at its second micro-step" in proc.stdout
