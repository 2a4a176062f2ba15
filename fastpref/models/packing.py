"""Prefix-shared packing: the rows of a preference batch without padding and without a second
copy of a prompt.

A collated batch holds every completion after its own copy of the prompt, right-padded to the
longest row: for 8 DPO pairs of ~9-token prompts and ~24-token completions, 704 token slots of
which 525 are real and only 455 distinct. Packing lays each distinct prompt out once, followed by
every completion that continues it, and puts these units side by side in a few rows:

    row 0: [prompt a | chosen a | rejected a | prompt b | chosen b | rejected b]
    row 1: [prompt c | chosen c | rejected c | pad ...]

Each token keeps the position it had in its own sequence (a completion restarts where its prompt
ends), and a 4-D mask lets a token see exactly what it saw in the padded batch: the earlier
tokens of its prompt and of its own completion, nothing of a sibling completion or another unit.
So every hidden state equals the padded batch's (up to float rounding from other GEMM shapes).
The scored positions are then gathered by index: the last prompt token is scored once per
completion that follows it, with each one's first token as target.

Packing needs a decoder that takes ``position_ids`` and a ready 4-D mask (Hugging Face models
with ``sdpa`` or ``eager`` attention); ``packing_supported`` says when a model does.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastpref.constants import IGNORE_INDEX

__all__ = ["Packed", "pack_rows", "packing_supported", "MAX_MASK_ELEMENTS"]


# The mask is [rows, 1, L, L]; past this many elements a padded batch is cheaper to hold.
MAX_MASK_ELEMENTS = 1 << 25
MAX_ROW = 128  # tokens: units shorter than this may share a row; its attention stays cheap


@dataclass
class Packed:
    input_ids: Tensor  # [rows, L]
    position_ids: Tensor  # [rows, L]
    mask: Tensor  # [rows, 1, L, L] bool, True = may attend
    source: Tensor  # [S] flat index (row * L + column) of each scored hidden state
    targets: Tensor  # [S] its target token
    sequence: Tensor  # [S] the input row (sequence) it belongs to
    num_sequences: int


def packing_supported(model: nn.Module, decoder: nn.Module) -> bool:
    """True for decoders that accept ``position_ids`` and a 4-D mask as-is.

    Hugging Face passes a 4-D mask straight to ``sdpa``/``eager`` attention; flash-attention
    kernels take no mask at all, and a sliding window would be replaced by our mask, so those
    models keep the padded batch.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "sliding_window", None):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    try:
        params = inspect.signature(decoder.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params and "attention_mask" in params


def _first_scored(labels: Tensor, lengths: Tensor) -> list[int]:
    """Per row, the first position whose label is scored (its length if none is)."""
    scored = labels != IGNORE_INDEX
    any_scored = scored.any(1)
    first = torch.where(any_scored, scored.int().argmax(1), lengths)
    return first.tolist()


def _first_fit(sizes: dict, capacity: int) -> list[list]:
    bins: list[list] = []
    fill: list[int] = []
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        for b, used in enumerate(fill):
            if used + sizes[key] <= capacity:
                bins[b].append(key)
                fill[b] += sizes[key]
                break
        else:
            bins.append([key])
            fill.append(sizes[key])
    return bins


def _bin_pack(sizes: dict) -> tuple[list[list], int]:
    """Units into rows, first-fit decreasing; the row length (between the longest unit and
    ``MAX_ROW``) is the one with the fewest token slots, rows x length."""
    longest = max(sizes.values(), default=1)
    best = None
    for capacity in range(longest, max(longest, MAX_ROW) + 1, 8):
        bins = _first_fit(sizes, capacity)
        length = max((sum(sizes[k] for k in b) for b in bins), default=1)
        if best is None or len(bins) * length < len(best[0]) * best[1]:
            best = (bins, length)
    return best


def _aligned_length(rows: int, length: int, multiple: int) -> int:
    """The row length that makes ``rows x length`` a multiple of ``multiple`` when that costs
    fewer than ``multiple`` extra slots in all (else ``length`` unchanged)."""
    if multiple <= 1:
        return length
    step = multiple // math.gcd(rows, multiple)
    aligned = -(-length // step) * step
    return aligned if rows * (aligned - length) < multiple else length


def pack_rows(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, row_multiple: int = 1
) -> Packed | None:
    """Pack right-padded rows (labels aligned with the hidden states, ``-100`` elsewhere).

    Rows whose tokens before their first scored position are identical share one copy of them.
    ``row_multiple``: lengthen the rows with padding so that ``rows x L`` (the row count every
    linear layer of the backbone sees) is a multiple of it, when fewer than ``row_multiple``
    extra slots do that. ``fastpref.ops.linear`` pads its input to ``ROW_PAD`` rows otherwise,
    a copy of the input and of its gradient in every layer (the DPO step of
    ``bench/bench_onednn_linear.py`` measured 0.947x with the rows aligned, Zen 4).
    Returns None when the batch is not right-padded (a 0 before a 1 in some row) or when the mask
    would exceed ``MAX_MASK_ELEMENTS``; the caller then runs the padded batch.
    """
    N, T = input_ids.shape
    am = attention_mask.bool()
    lengths = am.sum(1)
    if not torch.equal(am, torch.arange(T, device=am.device)[None, :] < lengths[:, None]):
        return None
    ids_cpu, labels_cpu = input_ids.cpu(), labels.cpu()
    lengths_l = lengths.tolist()
    first = _first_scored(labels_cpu, lengths.cpu())
    # A row's prompt is ids[: first + 1] (the last prompt token's hidden state scores the first
    # completion token); the rest of the row is its own suffix.
    cuts = [min(f + 1, n) for f, n in zip(first, lengths_l, strict=True)]

    # Units: one per distinct prompt, with the rows that continue it.
    units: dict[tuple[int, ...], list[int]] = {}
    for r in range(N):
        if lengths_l[r] == 0:
            continue
        key = tuple(ids_cpu[r, : cuts[r]].tolist()) if first[r] < lengths_l[r] else ("row", r)
        units.setdefault(key, []).append(r)  # a row without scored tokens is never shared
    sizes = {
        key: cuts[rows[0]] + sum(lengths_l[r] - cuts[rows[0]] for r in rows)
        for key, rows in units.items()
    }

    bins, L = _bin_pack(sizes)
    rows_n = max(len(bins), 1)
    L = _aligned_length(rows_n, L, row_multiple)
    if rows_n * L * L > MAX_MASK_ELEMENTS:
        return None

    ids = torch.zeros(rows_n, L, dtype=input_ids.dtype)
    pos = torch.zeros(rows_n, L, dtype=torch.long)
    mask = torch.zeros(rows_n, 1, L, L, dtype=torch.bool)
    source: list[Tensor] = []
    targets: list[Tensor] = []
    sequence: list[Tensor] = []
    for b, keys in enumerate(bins):
        col = 0
        for key in keys:
            rows = units[key]
            cut = cuts[rows[0]]  # the same for every row of the unit
            base = col
            ids[b, col : col + cut] = ids_cpu[rows[0], :cut]
            pos[b, col : col + cut] = torch.arange(cut)
            mask[b, 0, col : col + cut, col : col + cut] = torch.ones(
                cut, cut, dtype=torch.bool
            ).tril()
            col += cut
            for r in rows:
                n = lengths_l[r] - cut
                ids[b, col : col + n] = ids_cpu[r, cut : lengths_l[r]]
                pos[b, col : col + n] = torch.arange(cut, lengths_l[r])
                mask[b, 0, col : col + n, base : base + cut] = True  # the whole prompt
                mask[b, 0, col : col + n, col : col + n] = torch.ones(n, n, dtype=torch.bool).tril()
                t = (labels_cpu[r, : lengths_l[r]] != IGNORE_INDEX).nonzero()[:, 0]
                # column of position t: inside the prompt it is base + t, after it col + t - cut
                column = torch.where(t < cut, base + t, col + t - cut)
                source.append(b * L + column)
                targets.append(labels_cpu[r, t])
                sequence.append(torch.full_like(t, r))
                col += n
        if col < L:  # padding attends to itself only, so no softmax row is empty
            mask[b, 0, col:, col:] = torch.eye(L - col, dtype=torch.bool)
    device = input_ids.device

    def cat(parts: list[Tensor]) -> Tensor:
        return (
            torch.cat(parts).to(device)
            if parts
            else torch.zeros(0, dtype=torch.long, device=device)
        )

    return Packed(
        input_ids=ids.to(device),
        position_ids=pos.to(device),
        mask=mask.to(device),
        source=cat(source),
        targets=cat(targets),
        sequence=cat(sequence),
        num_sequences=N,
    )
