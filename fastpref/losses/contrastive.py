"""RankPO stage 1: InfoNCE over in-batch, hard and cross-device negatives, without false negatives.

The softmax of each query runs through the fused ``fastpref.infonce`` op (never the B×M
similarity matrix). What the op cannot know is which candidates are *false* negatives: a passage
whose text is one of query i's positives — its other positives, or its positive arriving a second
time as another query's positive or hard negative. Those are removed from query i's softmax
exactly, by subtracting their (few, explicitly scored) terms from the op's log-sum-exp::

    LSE_keep_i = LSE_i + log(1 − Σ_{j ∈ F_i} exp(s_ij − LSE_i))

where ``LSE_i = loss_i + s_i,pos`` is what the op computed. The subtraction loses precision only
when the removed terms hold nearly all of the row's mass (a false negative far closer than the
positive); such rows (``1 − Σ < 1e-2``) are recomputed exactly from their own row of scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpref.constants import accumulation_dtype
from fastpref.losses._checks import check_positive
from fastpref.losses.metrics import LossMetrics
from fastpref.losses.types import ContrastiveEmbeddings
from fastpref.ops import infonce

__all__ = ["false_negative_pairs", "infonce_loss"]

_EXACT_BELOW = 1e-2  # kept mass 1 − Σ under which a row is recomputed rather than subtracted


def infonce_loss(
    inputs: ContrastiveEmbeddings, *, temperature: float = 0.05, symmetric: bool = False
) -> tuple[Tensor, LossMetrics]:
    r"""Mean InfoNCE of B queries over every passage of the batch, false negatives removed.

    ``l_i = −s(q_i, p_i⁺)/τ + log Σ_{j ∉ F_i} exp(s(q_i, p_j)/τ)``, s the dot product of the
    embeddings (cosine when the model L2-normalises them), over all passages of the batch (of
    every rank with ``inputs.gather``), ``F_i`` the passages whose key is one of query i's
    positive keys, other than its positive itself. Layout: query i's group is
    ``passages[i·G:(i+1)·G]``, its positive first, then its hard negatives (DPR / RankPO).
    ``symmetric``: ``½(l_i + l_i^{p→q})`` with the passage→query term of CLIP, the positive
    against every query, queries that also have that positive removed likewise.

    Equals ``F.cross_entropy((q @ P.T / τ).masked_fill(F, -inf), arange(B)·G)`` (van den Oord
    et al., https://arxiv.org/abs/1807.03748; RankPO, https://arxiv.org/abs/2503.10723) with
    memory O((B + M)·D + |F|) instead of the B×M logits. τ = 0.05 is sentence-transformers'
    ``scale=20``; RankPO's code uses 0.02.

    Metrics: ``rewards/chosen`` = mean s(q_i, p_i⁺), ``rewards/rejected`` = mean similarity of
    each query's closest own hard negative, ``rewards/accuracies`` = fraction whose positive beats
    all its own hard negatives (ties ½ do not arise in practice; strict >).
    """
    check_positive("temperature", temperature)
    q, p, G = _check(inputs)
    B = q.shape[0]
    pos = torch.arange(B, device=q.device) * G
    gather = inputs.gather and _distributed()
    per = infonce(q, p, pos, temperature=temperature, normalize=False, gather=gather)
    keys, pos_keys = inputs.passage_keys, inputs.positive_keys
    if keys is not None:
        all_keys, p_offset = _gather_keys(keys, gather)
        rows, cols = false_negative_pairs(pos_keys, all_keys, exclude=pos + p_offset)
        p_all = _gather_rows(p, _any(rows.numel(), gather))
        per = _remove(per, q, p_all, pos + p_offset, rows, cols, temperature)
    if symmetric:
        anchors = p[pos]  # each query's positive against every query
        labels = torch.arange(B, device=q.device)
        back = infonce(anchors, q, labels, temperature=temperature, normalize=False, gather=gather)
        if keys is not None:
            all_pos_keys, q_offset = _gather_keys(pos_keys, gather)
            n_all, P = all_pos_keys.shape
            owners = torch.arange(n_all, device=q.device).repeat_interleave(P)
            rows, cols = false_negative_pairs(
                keys[pos][:, None],
                all_pos_keys.reshape(-1),
                exclude=labels + q_offset,
                owners=owners,
            )
            q_all = _gather_rows(q, _any(rows.numel(), gather))
            back = _remove(back, anchors, q_all, labels + q_offset, rows, cols, temperature)
        per = 0.5 * (per + back)
    return per.mean(), _metrics(q, p, G)


def false_negative_pairs(
    row_keys: Tensor, col_keys: Tensor, *, exclude: Tensor, owners: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of every pair whose column key is one of the row's keys, sorted, unique.

    ``row_keys``: ``[R, L]`` int64, each row's set (0 pads); ``col_keys``: ``[N]`` keys of the
    candidates, or of entries that ``owners`` (``[N]``) maps to candidate columns (a candidate
    with several keys); ``exclude``: ``[R]`` the one column each row keeps (its positive).
    O((R·L + N)·log N + pairs): a sort-merge join, never the R×N comparison.
    """
    R, L = row_keys.shape
    sorted_keys, order = torch.sort(col_keys, stable=True)
    flat = row_keys.reshape(-1)
    lo = torch.searchsorted(sorted_keys, flat, right=False)
    hi = torch.searchsorted(sorted_keys, flat, right=True)
    counts = torch.where(flat != 0, hi - lo, torch.zeros_like(lo))
    total = int(counts.sum())
    if total == 0:
        empty = torch.empty(0, dtype=torch.long, device=row_keys.device)
        return empty, empty
    owner = torch.arange(R, device=row_keys.device).repeat_interleave(L)
    rows = owner.repeat_interleave(counts)
    starts = torch.cumsum(counts, 0) - counts  # first output slot of each entry
    within = torch.arange(total, device=row_keys.device) - starts.repeat_interleave(counts)
    cols = order[lo.repeat_interleave(counts) + within]
    n_cols = col_keys.numel()
    if owners is not None:
        cols = owners[cols]
        n_cols = int(owners.max()) + 1 if owners.numel() else 1
    keep = cols != exclude[rows]
    return _unique_pairs(rows[keep], cols[keep], n_cols)


def _unique_pairs(rows: Tensor, cols: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    flat = torch.unique(rows * max(n_cols, 1) + cols)  # sorted
    return flat // max(n_cols, 1), flat % max(n_cols, 1)


def _remove(
    per: Tensor, anchors: Tensor, cands: Tensor, pos: Tensor, rows: Tensor, cols: Tensor, tau
) -> Tensor:
    """``per`` (= LSE_i − s_i,pos over all candidates) with the (rows, cols) candidates removed."""
    if rows.numel() == 0:
        return per
    acc = accumulation_dtype(anchors.dtype)
    a, c = anchors.to(acc), cands.to(acc)
    s_pos = (a * c[pos]).sum(-1) / tau  # [B]
    s_false = (a[rows] * c[cols]).sum(-1) / tau  # [pairs]
    lse = per.to(acc) + s_pos
    removed = torch.zeros_like(per, dtype=acc).index_add(0, rows, torch.exp(s_false - lse[rows]))
    exact = removed > 1 - _EXACT_BELOW
    safe = torch.where(exact, torch.zeros_like(removed), removed)
    out = per.to(acc) + torch.log1p(-safe)
    if bool(exact.any()):  # rare: recompute these rows from their own scores
        idx = exact.nonzero().squeeze(1)
        scores = a[idx] @ c.T / tau  # [R, N]
        slot = torch.full((per.shape[0],), -1, dtype=torch.long, device=per.device)
        slot[idx] = torch.arange(idx.numel(), device=per.device)
        hit = slot[rows] >= 0
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[slot[rows[hit]], cols[hit]] = True
        row_loss = torch.logsumexp(scores.masked_fill(mask, float("-inf")), -1) - s_pos[idx]
        out = out.index_put((idx,), row_loss)
    return out.to(per.dtype)


def _metrics(q: Tensor, p: Tensor, G: int) -> LossMetrics:
    with torch.no_grad():
        B, D = q.shape
        scores = torch.einsum("bd,bgd->bg", q.float(), p.float().view(B, G, D))  # own group
        chosen = scores[:, 0]
        if G == 1:
            return LossMetrics(rewards_chosen=chosen.mean())
        hardest = scores[:, 1:].max(-1).values
        return LossMetrics(
            rewards_chosen=chosen.mean(),
            rewards_rejected=hardest.mean(),
            rewards_accuracies=(chosen > hardest).float().mean(),
            rewards_margins=(chosen - hardest).mean(),
        )


def _check(inputs: ContrastiveEmbeddings) -> tuple[Tensor, Tensor, int]:
    if not isinstance(inputs, ContrastiveEmbeddings):
        raise TypeError(
            f"infonce: inputs must be ContrastiveEmbeddings, got {type(inputs).__name__}"
        )
    q, p = inputs.queries, inputs.passages
    if q.dim() != 2 or p.dim() != 2 or q.shape[0] == 0 or p.shape[0] % q.shape[0]:
        raise ValueError(
            f"infonce: queries [B, D] and passages [B·G, D] expected, got "
            f"{tuple(q.shape)} and {tuple(p.shape)}"
        )
    G = p.shape[0] // q.shape[0]
    if (inputs.passage_keys is None) != (inputs.positive_keys is None):
        raise ValueError("infonce: passage_keys and positive_keys go together")
    if inputs.passage_keys is not None:
        if inputs.passage_keys.shape != (p.shape[0],):
            raise ValueError(
                f"infonce: passage_keys must be [{p.shape[0]}], "
                f"got {tuple(inputs.passage_keys.shape)}"
            )
        if inputs.positive_keys.dim() != 2 or inputs.positive_keys.shape[0] != q.shape[0]:
            raise ValueError(
                f"infonce: positive_keys must be [{q.shape[0]}, P], "
                f"got {tuple(inputs.positive_keys.shape)}"
            )
    return q, p, G


# ---------------------------------------------------------------------------------------------
# cross-device: keys and (only when a false negative needs them) embeddings of every rank


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any(count: int, gather: bool) -> bool:
    """Whether any rank has ``count > 0`` (every rank must take the same collective path)."""
    if not gather:
        return count > 0
    flag = torch.tensor([float(count > 0)])
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _gather_keys(keys: Tensor, gather: bool) -> tuple[Tensor, int]:
    """Every rank's ``keys`` rows concatenated (no grad), and the offset of ours."""
    if not gather:
        return keys, 0
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([keys.shape[0]], device=keys.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = keys.new_zeros((max(sizes), *keys.shape[1:]))
    padded[: keys.shape[0]] = keys
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:s] for part, s in zip(parts, sizes, strict=True)]), sum(sizes[:rank])


def _gather_rows(x: Tensor, needed: bool) -> Tensor:
    """All ranks' rows of ``x`` with gradients routed back to their owners (the op's gather)."""
    if not (needed and _distributed()):
        return x
    from fastpref.ops.infonce import _all_gather_rows

    return _all_gather_rows(x)[0]
