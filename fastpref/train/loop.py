"""The training loop, top to bottom: setup -> reference -> steps -> eval -> save.

It knows no family: the objective's family gives a task (``fastpref.families.base.Task``), and
the loop only reads data through it, asks it for batches, steps and evaluations, and saves
through it. DeepSpeed, the schedule, the metrics log and the checkpoints are the loop's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path

import torch

from fastpref.errors import TrainingError
from fastpref.families import family_of, get_objective
from fastpref.families.base import Dist, EvalResult, batch_to_device
from fastpref.ops.decoder import use_fused_decoder_ops
from fastpref.ops.linear import use_onednn_linears
from fastpref.paths import looks_local
from fastpref.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastpref.train.config import ConfigError, TrainConfig, loss_hparams
from fastpref.train.engine import (
    ClippedAdamW,
    deepspeed_config,
    init_distributed,
    make_engine,
    quiet_libraries,
    sparse_embedding_gradients,
)
from fastpref.train.reference import prepare_reference
from fastpref.train.runlog import RunLog
from fastpref.train.save import save_final
from fastpref.train.step import run_step

__all__ = ["train"]


def _check_files(cfg: TrainConfig) -> None:
    """Every missing file that needs no model or data, before anything heavy starts."""
    for flag, path in (("data", cfg.data), ("eval-split", cfg.eval_split)):
        if path is not None and looks_local(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"--{flag}: {path!r} does not exist")
    if cfg.deepspeed is not None and not Path(cfg.deepspeed).expanduser().exists():
        raise FileNotFoundError(f"--deepspeed: {cfg.deepspeed!r} does not exist")
    if cfg.resume and cfg.output_dir is None:
        raise ConfigError("--resume needs --output-dir (the run to continue)")


def _resolve(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, dict]:
    """The DeepSpeed config (a --deepspeed file's own values win) and cfg updated to match."""
    ds = deepspeed_config(cfg, world_size)
    cfg = dataclasses.replace(
        cfg,
        micro_batch=int(ds["train_micro_batch_size_per_gpu"]),
        grad_accum=int(ds["gradient_accumulation_steps"]),
        zero_stage=int(ds.get("zero_optimization", {}).get("stage", 0)),
        bf16=bool(ds.get("bf16", {}).get("enabled", False)),
    )
    return cfg, ds


def _load_examples(task, cfg: TrainConfig) -> tuple[list[dict], list[dict], str]:
    from fastpref.data import split_rows

    source = cfg.data or str(task.default_data)
    rows = task.read(source, cfg.columns)  # DataError names file, row and field
    if cfg.eval_split is not None:
        train_rows, eval_rows = rows, task.read(cfg.eval_split, cfg.columns)
    else:
        train_rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    if not train_rows or not eval_rows:
        raise ConfigError(
            f"{source}: {len(train_rows)} training and {len(eval_rows)} held-out "
            "rows; both splits need at least one"
        )
    return train_rows, eval_rows, source


def _output_dir(cfg: TrainConfig, dist: Dist) -> Path:
    out = [cfg.output_dir or f"runs/{cfg.loss}-{datetime.now():%Y%m%d-%H%M%S}"]
    if dist.world_size > 1:  # one directory for all ranks, whatever each clock says
        torch.distributed.broadcast_object_list(out, src=0)
    return Path(out[0])


def _total_steps(cfg: TrainConfig, task, n_train: int, global_batch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.epochs is None and cfg.data is None and cfg.model is None:
        return task.embedded_steps
    return max(1, math.ceil((cfg.epochs or 1.0) * n_train / global_batch))


def _stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count`` of an endless stream of per-epoch permutations."""
    out, perms = [], {}
    for k in range(start, start + count):
        epoch = k // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(
                n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
            )
        out.append(int(perms[epoch][k % n]))
    return out


def _open_run(cfg: TrainConfig, out_dir: Path, dist: Dist) -> str | None:
    """Claim the run directory (checks, lock, config.json); the checkpoint to resume from."""
    ckpt_dir = out_dir / "checkpoints"
    if not cfg.resume and latest_checkpoint(ckpt_dir) is not None:
        raise ConfigError(
            f"{out_dir} already holds checkpoints: pass --resume to continue that run, "
            "or choose another --output-dir (nothing is overwritten)"
        )
    finished = [n for n in ("model", "metrics.jsonl") if (out_dir / n).exists()]
    if finished and not cfg.resume and not cfg.overwrite:
        raise ConfigError(
            f"{out_dir} holds a finished run ({', '.join(finished)}): pass --overwrite to "
            "replace it, or choose another --output-dir"
        )
    if dist.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    _lock_run_dir(out_dir, dist)
    if dist.rank == 0:
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return latest_checkpoint(ckpt_dir) if cfg.resume else None


_RUN_LOCKS: dict[Path, object] = {}  # held open (and so locked) until this process ends


def _lock_run_dir(out_dir: Path, dist: Dist) -> None:
    """One live run per directory: rank 0 holds an exclusive lock on ``<out_dir>/.lock`` for
    the life of the process; a second run pointed at it refuses (on every rank)."""
    import fcntl

    problem = None
    if dist.rank == 0 and out_dir.resolve() not in _RUN_LOCKS:
        handle = open(out_dir / ".lock", "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            problem = f"{out_dir} is in use by a live run ({owner}); choose another --output-dir"
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            _RUN_LOCKS[out_dir.resolve()] = handle
    if dist.world_size > 1:
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise ConfigError(problem)


def _recorded(cfg: TrainConfig, lr: float, out_dir: Path) -> TrainConfig:
    """The values a run actually uses, as config.json records them: the resolved lr and
    absolute local paths."""

    def absolute(path: str | None) -> str | None:
        if path is None or not Path(path).expanduser().exists():
            return path  # unset, or a hub name
        return str(Path(path).expanduser().resolve())

    paths = ("model", "ref_model", "tokenizer", "data", "eval_split", "deepspeed", "cache_dir")
    return dataclasses.replace(
        cfg,
        lr=lr,
        output_dir=str(out_dir.resolve()),
        **{name: absolute(getattr(cfg, name)) for name in paths},
    )


def _resume(engine, cfg: TrainConfig, ckpt_dir: Path, tag: str | None, data_order, rank, say):
    """Load checkpoint ``tag`` (if any); returns its client state (``step``, ``wall_s``)."""
    if tag is None:
        if cfg.resume:
            say(f"--resume: no complete checkpoint in {ckpt_dir}, starting from step 0")
        return {"step": 0, "wall_s": 0.0}
    client = load_checkpoint(engine, ckpt_dir, tag, rank)
    if client.get("data_order") != data_order:  # another batch or seed: not the same run
        raise ConfigError(
            f"--resume: {ckpt_dir / tag} was written with (global batch, seed, train "
            f"examples) = {client.get('data_order')}, this run has {data_order}"
        )
    say(f"resumed from {ckpt_dir / tag} at step {client['step']}")
    return client


def _non_finite(cfg: TrainConfig, step: int, in_row: int, bar, ckpt_dir: Path) -> None:
    """A step whose loss or gradient was NaN/inf made no update: warn, or stop (--nan-policy)."""
    kept = latest_checkpoint(ckpt_dir)
    kept = f"; the latest checkpoint, {ckpt_dir / kept}, predates it" if kept else ""
    if cfg.nan_policy == "stop" or in_row >= cfg.max_bad_steps:
        why = "--nan-policy stop" if cfg.nan_policy == "stop" else (
            f"{in_row} in a row (--max-bad-steps {cfg.max_bad_steps})"
        )  # fmt: skip
        raise TrainingError(
            f"step {step}: non-finite loss or gradient norm, {why}; no update was made from "
            f"it and nothing was saved after it{kept}"
        )
    if bar is not None:
        bar.write(f"step {step}: non-finite loss or gradient norm; its update skipped")


def _first_eval(log: RunLog) -> EvalResult | None:
    """The step-0 evaluation a resumed run's log kept from the run it continues."""
    for r in log.records():
        if r.get("step") == 0 and "eval/accuracy" in r:
            metrics = {k[5:]: v for k, v in r.items() if k.startswith("eval/")}
            return EvalResult(metrics.pop("loss"), metrics.pop("accuracy"), metrics)
    return None


def _summary(loss, steps, out_dir, before, after, ref_hit, bad_steps) -> dict:
    """What ``summary.json`` says of a run (``save_final`` adds the wall time)."""
    return {
        "loss": loss,
        "steps": steps,
        "output_dir": str(out_dir),
        "accuracy_before": before.accuracy if before else None,
        "accuracy_after": after.accuracy,
        "eval_loss_after": after.loss,
        "eval_before": before.record() if before else None,
        "eval_after": after.record(),
        "reference_cache_hit": ref_hit,
        "non_finite_steps": bad_steps,
    }


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the summary also written to ``<output_dir>/summary.json``."""
    t_start = time.perf_counter()
    # ------------------------------------------------------------------ setup
    objective = get_objective(cfg.loss)
    hparams = loss_hparams(cfg, objective)
    _check_files(cfg)
    quiet_libraries(cfg.progress)
    rank, world_size = init_distributed()
    cfg, ds_config = _resolve(cfg, world_size)
    task = family_of(cfg.loss).start(objective, cfg, hparams)
    train_rows, eval_rows, source = _load_examples(task, cfg)
    from deepspeed.accelerator import get_accelerator

    dist = Dist(torch.device(get_accelerator().current_device_name()), rank, world_size)
    say = print if rank == 0 else (lambda *a, **k: None)
    lr = cfg.lr if cfg.lr is not None else task.default_lr
    out_dir = _output_dir(cfg, dist)
    cfg = _recorded(cfg, lr, out_dir)
    resume_tag = _open_run(cfg, out_dir, dist)
    torch.manual_seed(cfg.seed + rank)
    train_ex = task.prepare(train_rows, source, "train")
    eval_ex = task.prepare(eval_rows, cfg.eval_split or source, "eval")
    model = task.build_model(dist)
    if dist.device.type == "cpu":  # nn.Linear's fp32 GEMMs in oneDNN (FASTPREF_LINEAR=aten: not)
        use_onednn_linears(model.module)
        use_fused_decoder_ops(model.module)  # RMSNorm, SwiGLU (FASTPREF_DECODER_OPS=aten: not)
    if model.vocab is not None and len(task.tokenizer) > model.vocab:
        raise ConfigError(
            f"the tokenizer has {len(task.tokenizer)} tokens but the model embeds only "
            f"{model.vocab}: pass the model's own --tokenizer"
        )
    # ------------------------------------------------------------------ reference
    ref_hit = prepare_reference(task, {"train": train_ex, "eval": eval_ex}, cfg, dist)
    if ref_hit is not None:
        say("reference values: " + ("loaded from cache" if ref_hit else "precomputed and cached"))
    # ------------------------------------------------------------------ engine and schedule
    global_batch = cfg.micro_batch * cfg.grad_accum * world_size
    total_steps = _total_steps(cfg, task, len(train_ex), global_batch)
    eval_every = cfg.eval_every or math.ceil(total_steps / 5)
    engine, scheduler = make_engine(model.module, ds_config, cfg, lr, total_steps)
    if model.hf_model is not None:
        sparse_embedding_gradients(model.hf_model, engine)
    # ZeRO and ClippedAdamW report the global norm; otherwise it is read before the step
    norm_before_step = cfg.zero_stage == 0 and not isinstance(engine.optimizer, ClippedAdamW)
    ckpt_dir, data_order = out_dir / "checkpoints", [global_batch, cfg.seed, len(train_ex)]
    resumed = _resume(engine, cfg, ckpt_dir, resume_tag, data_order, rank, say)
    start_step, t_start = resumed["step"], t_start - resumed.get("wall_s", 0.0)
    resume_step = start_step if cfg.resume else None
    log = RunLog(out_dir, enabled=rank == 0, tensorboard=cfg.tensorboard, resume_step=resume_step)

    def run_eval(step: int) -> EvalResult:
        result = task.evaluate(engine, eval_ex, dist)
        log.write({"step": step, **result.record()})
        return result

    say(
        f"fastpref-train: loss={objective.name} format={objective.fmt} train={len(train_ex)} "
        f"eval={len(eval_ex)} steps={total_steps} global_batch={global_batch} lr={lr:g} "
        f"world={world_size} device={engine.device} out={out_dir}"
    )
    before = run_eval(start_step) if start_step == 0 else _first_eval(log)
    if start_step == 0:
        say(f"held-out {task.metric_name} before training: {before.accuracy:.3f} "
            f"(eval loss {before.loss:.4f})")  # fmt: skip
    # ------------------------------------------------------------------ steps
    from tqdm.auto import tqdm

    show = rank == 0 and cfg.progress
    bar = tqdm(total=total_steps, initial=start_step, disable=not show, desc=objective.name,
               dynamic_ncols=True)  # fmt: skip
    engine.train()
    after, bad_steps, bad_in_row = None, resumed.get("bad_steps", 0), 0
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        step_lr = scheduler.get_last_lr()[0] if scheduler is not None else lr  # used by this step
        batches = []
        for micro in range(cfg.grad_accum):
            first = step * global_batch + (micro * world_size + rank) * cfg.micro_batch
            idx = _stream_indices(len(train_ex), cfg.seed, first, cfg.micro_batch)
            batch = task.collate([train_ex[i] for i in idx])
            batches.append(batch_to_device(batch, engine.device))
        record = run_step(task, engine, batches, world_size, norm_before_step)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps or record.skipped:
            epoch = (step + 1) * global_batch / len(train_ex)
            log.write(record.as_dict(step + 1, epoch, step_lr, t0))
        bad_in_row = bad_in_row + 1 if record.skipped else 0
        bad_steps += record.skipped
        if record.skipped:
            _non_finite(cfg, step + 1, bad_in_row, bar if rank == 0 else None, ckpt_dir)
        acc = record.means.get("rewards/accuracies", math.nan)
        bar.set_postfix(loss=f"{record.loss:.4f}", acc=f"{acc:.2f}")
        bar.update(1)
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            after = run_eval(step + 1)
            if rank == 0:
                bar.write(f"step {step + 1}: eval loss {after.loss:.4f}, "
                          f"held-out {task.metric_name} {after.accuracy:.3f}")  # fmt: skip
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            wall = time.perf_counter() - t_start  # the whole run's, across resumes
            client = {"step": step + 1, "data_order": data_order, "wall_s": wall}
            client["bad_steps"] = bad_steps
            keep = cfg.save_total_limit
            save_checkpoint(engine, ckpt_dir, step + 1, client, keep=keep, rank=rank)
    bar.close()
    if after is None:  # resumed at the very end
        after = run_eval(total_steps)
    # ------------------------------------------------------------------ save
    summary = _summary(objective.name, total_steps, out_dir, before, after, ref_hit, bad_steps)
    save_final(task, engine, out_dir, cfg, log, summary, t_start, rank == 0)
    if rank == 0:
        change = f": {before.accuracy:.3f} ->" if before is not None else " after training:"
        print(f"held-out {task.metric_name}{change} {after.accuracy:.3f}")
        print(f"saved {out_dir / 'model'} ({time.perf_counter() - t_start:.0f} s)")
    log.close()
    handle = _RUN_LOCKS.pop(out_dir.resolve(), None)
    if handle is not None:
        handle.close()  # the run is over: the directory is free again
    return summary
