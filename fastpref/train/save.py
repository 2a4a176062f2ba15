"""The end of a run: free the optimizer state, save the final model through the task, write
the summary and the curves."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from fastpref.errors import TrainingError
from fastpref.ops import release_kernel_buffers
from fastpref.train.runlog import RunLog, plot_curves

__all__ = ["save_final"]


def save_final(
    task, engine, out_dir: Path, cfg, log: RunLog, summary: dict, t_start: float, is_main: bool
) -> None:
    """``<out_dir>/model`` (the task's format, consolidated from ZeRO-3 shards when needed),
    ``summary.json`` (``summary`` plus the wall time) and ``curves.png``."""
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        # Training is over: the moments (2x the model) go before saving reads every weight and
        # the plot loads matplotlib, so the run's last acts do not set its peak memory.
        engine.optimizer.state.clear()
    release_kernel_buffers()  # the kernels' recycled kept-logits and dW buffers, likewise
    final_dir, partial = out_dir / "model", out_dir / "model.partial"
    state = None
    if cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        state = {k.removeprefix("model."): v for k, v in state.items()} if is_main else None
    if is_main:  # written aside, then renamed: a killed save never leaves a model/ that looks whole
        shutil.rmtree(partial, ignore_errors=True)
        try:
            task.save(engine.module, partial, state)
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise TrainingError(
                f"saving the final model to {partial} failed ({e.strerror or e}); the "
                "checkpoints and metrics.jsonl are intact (--resume saves it again)"
            ) from e
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(partial, final_dir)
    summary["wall_s"] = time.perf_counter() - t_start
    if is_main:
        title = f"fastpref-train --loss {summary['loss']}"
        plot_curves(log.records(), out_dir / "curves.png", title)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
