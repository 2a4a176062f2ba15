"""Reference log-probs, computed once before training and cached on disk.

The frozen reference π_ref only ever contributes Σ log π_ref(completion) per example and role,
so instead of a second model in every step we run it once over the train and eval examples (the
fused op under ``no_grad``), keep a ``[n_examples, R_ref]`` table, and look rows up by
``example_id``. The table is cached under ``<cache_dir>/ref_logps/<key>.pt`` where the key hashes
the reference model's identity (path + config + weight files, or a digest of a built model's
weights), the tokenised examples (ids and labels: the data rows and every tokenisation setting)
and the precision, so a later run on the same model and data skips the pass entirely.
"""

from __future__ import annotations

import array
import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from fastpref.train.step import batch_to_device, reference_rows

__all__ = ["cache_key", "compute_reference_table", "default_cache_dir", "load_or_compute"]

_VERSION = "2"  # bump when the table changes in meaning or rounding (2: packed batches)


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


def cache_key(identity: str, fmt: str, examples: list[dict], settings: dict) -> str:
    h = hashlib.sha256()
    _feed(h, [_VERSION, identity, fmt, settings, examples])
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_reference_table(
    scorer: nn.Module,
    examples: list[dict],
    fmt: str,
    pad_id: int,
    *,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """``[max example_id + 1, R_ref]`` float32 of Σ log π_ref per example and role.

    Batches are split across ranks and the rows all-gathered, so every rank ends with the table.
    Unused cells (dropped examples, list padding) are 0.
    """
    from fastpref.data import collate

    was_training = scorer.training
    scorer.eval()
    rows: list[tuple[list[int], Tensor]] = []
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    for chunk in batches[rank::world_size]:
        batch = batch_to_device(collate(chunk, fmt, pad_id), device)
        R, B = batch["num_roles"], batch["batch_size"]
        n = reference_rows(fmt, R) * B
        # Every row goes through the scorer, as in evaluation, even where the loss needs the
        # reference of only some roles (rdpo's rationale): packed batches of other rows round
        # differently, and a policy equal to its reference must tie with it exactly.
        logps, _ = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        rows.append((batch["example_ids"].tolist(), logps[:n].view(-1, B).T.float().cpu()))
    scorer.train(was_training)
    if world_size > 1:
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    n_examples = 1 + max((e["example_id"] for e in examples), default=-1)
    width = max((v.shape[1] for _, v in rows), default=1)
    table = torch.zeros(n_examples, width)
    for ids, values in rows:
        table[ids, : values.shape[1]] = values
    return table


def load_or_compute(
    cache_dir: Path, key: str, compute, *, rank: int = 0, world_size: int = 1
) -> tuple[Tensor, bool]:
    """The cached table for ``key``, or ``compute()`` saved atomically; returns ``(table, hit)``."""
    path = Path(cache_dir) / "ref_logps" / f"{key}.pt"
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), True
        except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed, never trusted
            pass
    table = compute()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(table, tmp)
        os.replace(tmp, path)
    if world_size > 1:
        torch.distributed.barrier()
    return table, False
