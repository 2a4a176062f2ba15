"""DeepSpeed checkpoints that are never half-written when they become the latest.

Layout under ``<output_dir>/checkpoints``: ``step_000040/`` (a complete DeepSpeed checkpoint) and
``latest`` (a text file naming it). A save goes to ``step_N.partial`` on every rank, then rank 0
renames the directory and only then replaces ``latest`` (write to a temporary file, ``os.replace``,
both atomic on POSIX). A process killed at any moment leaves ``latest`` naming a complete
checkpoint; ``*.partial`` leftovers are ignored and removed by the next save. Older complete
checkpoints beyond ``keep`` are deleted only after the new one is the latest.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from fastpref.errors import ConfigError, TrainingError

__all__ = ["latest_checkpoint", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


_TAG = re.compile(r"step_\d{6}")


def rng_state() -> dict:
    """Every RNG's state as tensors, lists and numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """The tag named by ``latest`` if that checkpoint directory exists, else None."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    if not _TAG.fullmatch(tag):  # only a checkpoint of this directory, never a path elsewhere
        raise ConfigError(f"{latest}: names {tag!r}, not a checkpoint of this run (step_NNNNNN)")
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def save_checkpoint(
    engine, ckpt_dir: Path, step: int, client_state: dict, *, keep: int, rank: int
) -> str:
    ckpt_dir = Path(ckpt_dir)
    tag = f"step_{step:06d}"
    partial = f"{tag}.partial"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
    _barrier()
    # per-rank RNG states travel in the per-rank client state (DeepSpeed saves rank 0's only, so
    # each rank also writes its own small file)
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False
        )
        torch.save(rng_state(), ckpt_dir / partial / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as e:  # disk full, file too large, unwritable (torch.save
        # reports a short write as a RuntimeError): stop, and keep what is whole
        shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
        kept = latest_checkpoint(ckpt_dir)
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1]
        raise TrainingError(
            f"writing checkpoint {ckpt_dir / partial} failed ({why}); "
            + (f"the latest complete checkpoint, {ckpt_dir / kept}," if kept else "no checkpoint")
            + " and the metrics written so far are intact"
        ) from e
    _barrier()
    if rank == 0:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        os.replace(ckpt_dir / partial, ckpt_dir / tag)
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        complete = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and "." not in p.name)
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return tag


def load_checkpoint(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Load weights, optimizer, scheduler and this rank's RNG; returns the client state."""
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if client_state is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir / tag}")
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state
