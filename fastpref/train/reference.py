"""Reference log-probs, computed once before training and cached on disk.

A frozen reference (π_ref of the DPO family, RankPO's stage-1 encoder) only ever contributes a
few numbers per example (Σ log π_ref per role, a similarity per passage), so instead of a second
model in every step the task's reference scorer runs once over the train and eval examples under
``no_grad``; the loop keeps a ``[n_examples, R_ref]`` table and the task looks rows up by
``example_id``. What the values are is the task's (``Task.reference_values``); batching across
ranks and caching is here. The table is cached under ``<cache_dir>/ref_logps/<key>.pt`` where
the key hashes the task's reference identity (model path + config + weight files, or a digest
of a built model's weights; the format and precision), the tokenised examples (ids and labels:
the data rows and every tokenisation setting) and the batch layout (world size and batch
size: other batches round differently), so a later run on the same model and data skips the
pass entirely.
"""

from __future__ import annotations

import array
import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from fastpref.families.base import Dist, Task, batch_to_device, gather_objects
from fastpref.ops.decoder import FusedRMSNorm, FusedSwiGLUMLP, use_fused_decoder_ops
from fastpref.ops.linear import OneDNNLinear, use_onednn_linears

__all__ = [
    "cache_key",
    "compute_reference_table",
    "default_cache_dir",
    "load_or_compute",
    "prepare_reference",
]

_VERSION = "3"  # bump when the table changes in meaning or rounding (3: world size in the key)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTPREF_CACHE", Path.home() / ".cache" / "fastpref"))


def _feed(h: hashlib._Hash, obj: object) -> None:
    """Hash nested dicts/lists/tensors/scalars unambiguously (tensors by dtype, shape, bytes)."""
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, list | tuple) and obj and all(type(x) is int for x in obj):
        h.update(f"i[{len(obj)}".encode())  # token ids: one update, not one per token
        h.update(array.array("q", obj).tobytes())
    elif isinstance(obj, list | tuple):
        h.update(f"[{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
    elif isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def cache_key(identity: str, examples: list[dict], settings: dict) -> str:
    """The cache file's name: the reference's identity (the task's: model, format, precision),
    the tokenised examples and the loop's settings that change the values' rounding."""
    h = hashlib.sha256()
    _feed(h, [_VERSION, identity, settings, examples])
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_reference_table(
    task: Task, scorer: nn.Module, examples: list[dict], *, batch_size: int, dist: Dist
) -> Tensor:
    """``[max example_id + 1, R_ref]`` float32 of the task's reference values per example.

    Batches are split across ranks and the rows all-gathered, so every rank ends with the table.
    Unused cells (dropped examples, list padding) are 0.
    """
    was_training = scorer.training
    scorer.eval()
    rows: list[tuple[list[int], Tensor]] = []
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    for chunk in batches[dist.rank :: dist.world_size]:
        batch = batch_to_device(task.collate(chunk), dist.device)
        values = task.reference_values(scorer, batch)  # [B, R_ref]
        rows.append((batch["example_ids"].tolist(), values.float().cpu()))
    scorer.train(was_training)
    rows = [r for part in gather_objects(rows, dist) for r in part]
    n_examples = 1 + max((e["example_id"] for e in examples), default=-1)
    width = max((v.shape[1] for _, v in rows), default=1)
    table = torch.zeros(n_examples, width)
    for ids, values in rows:
        table[ids, : values.shape[1]] = values
    return table


def prepare_reference(task: Task, splits: dict[str, list[dict]], cfg, dist: Dist) -> bool | None:
    """Give the task its reference values: precomputed once per split and cached on disk
    (``--ref-in-pass``: the frozen scorer itself). Returns whether the cache was hit, or None
    when the objective needs no reference."""
    got = task.reference_scorer(dist)
    if got is None:
        return None
    scorer, identity = got
    if dist.device.type == "cpu":  # as the policy (train/loop.py); often the same module
        use_onednn_linears(scorer)
        use_fused_decoder_ops(scorer)
    if any(isinstance(m, OneDNNLinear) for m in scorer.modules()):
        identity += "|linear=onednn"  # its values round differently from nn.Linear's
    if any(isinstance(m, FusedRMSNorm | FusedSwiGLUMLP) for m in scorer.modules()):
        identity += "|decoder=native"  # so do the native RMSNorm / SwiGLU
    if cfg.ref_in_pass:
        task.use_reference("train", None, scorer)
        return None
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    # the batch layout (and so the packed shapes) decides the values' last bits: a policy
    # equal to its reference ties with it exactly only when both ran in the same batches
    layout = {"world_size": dist.world_size, "batch_size": 2 * cfg.micro_batch}
    hit = None
    for split, examples in splits.items():
        table, hit = load_or_compute(
            cache_dir,
            cache_key(identity, examples, layout),
            lambda ex=examples: compute_reference_table(
                task, scorer, ex, batch_size=2 * cfg.micro_batch, dist=dist
            ),
            dist=dist,
        )
        task.use_reference(split, table.to(dist.device), None)
    return hit


def load_or_compute(cache_dir: Path, key: str, compute, *, dist: Dist) -> tuple[Tensor, bool]:
    """The cached table for ``key``, or ``compute()`` saved atomically; returns ``(table, hit)``."""
    path = Path(cache_dir) / "ref_logps" / f"{key}.pt"
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), True
        except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed, never trusted
            pass
    table = compute()
    if dist.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(table, tmp)
        os.replace(tmp, path)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return table, False
