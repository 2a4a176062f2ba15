"""Contrastive InfoNCE loss on the fused linear-log-probs kernel, with cross-device negatives.

InfoNCE of query i over passages is a softmax cross-entropy in which the passages play the
vocabulary: ``-log_softmax(q_i @ P.T / τ)[pos_i] == -linear_logprobs(q, P, pos, temperature=τ)``.
So this op is a composition over ``fastpref.ops.linear_logprobs`` (tiled GEMM + online
log-sum-exp, backward by recomputation) and never materialises the B×M similarity matrix:
its extra memory is the normalised copies of the inputs, O((B+M)·D), plus the kernel's tile.

Layout (RankPO / sentence-transformers style): query i owns a group of ``group_size`` passages,
``passages[i*G:(i+1)*G]``, positive first, then hard negatives; with in-batch negatives every
other passage of the batch (of the global batch with ``gather=True``) is a negative too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.constants import accumulation_dtype
from fastpref.ops._dispatch import select_backend
from fastpref.ops.linear_logprobs import run_logprobs

__all__ = ["infonce", "infonce_reference"]


@dataclass(frozen=True)
class _Options:
    """The non-tensor options the row computations need."""

    temperature: float
    symmetric: bool
    group_size: int | None  # set: group-only softmax over each query's own G passages
    backend: str  # the resolved backend, passed on to linear_logprobs' kernels
    pos_checked: bool  # positive_index was range-checked here (not under torch.compile)


def infonce(
    queries: Tensor,
    passages: Tensor,
    positive_index: Tensor | None = None,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    normalize: bool = True,
    group_size: int | None = None,
    in_batch: bool = True,
    gather: bool = False,
    backend: str | None = None,
) -> Tensor:
    r"""Per-query InfoNCE loss, ``[B]`` float32, without materialising the B×M similarities.

    Loss of query i (van den Oord et al., https://arxiv.org/abs/1807.03748; with in-batch and
    hard negatives as in DPR, https://arxiv.org/abs/2004.04906)::

        l_i = -s(q_i, p_{pos_i})/τ + logsumexp_{j ∈ C_i} s(q_i, p_j)/τ

    ``s`` is the cosine similarity when ``normalize`` (both sides L2-normalised, a differentiable
    step before the kernel), the raw dot product otherwise. The candidates ``C_i`` are all M
    passages (``in_batch=True``) or only query i's own group of ``group_size`` passages
    (``in_batch=False``, an O(B·G) batched dot product; no kernel needed).

    Equals ``F.cross_entropy(q @ P.T / τ, pos, reduction="none")`` (``infonce_reference``) with
    extra memory O((B+M)·D) + the kernel's tile instead of the B×M float32 logits.

    Args:
        queries: ``[B, D]``.
        passages: ``[M, D]``, same dtype and device.
        positive_index: ``[B]`` integer index of each query's positive passage in ``[0, M)``.
            Default ``arange(B) * group_size`` (the positive opens each group). Checked eagerly
            (ValueError naming the first bad position); under ``torch.compile`` that
            data-dependent check is left to the kernel's own target check.
        temperature: τ > 0.
        symmetric: also the passage→query direction for the positives (CLIP,
            https://arxiv.org/abs/2103.00020): positive passage ``p_{pos_i}`` against all B
            queries (every query of the global batch with ``gather``), its label being query i::

                l_i = ½ (l_i^{q→p} + l_i^{p→q}),
                l_i^{p→q} = -s(p_{pos_i}, q_i)/τ + logsumexp_k s(p_{pos_i}, q_k)/τ

            so ``l.mean()`` is CLIP's ``(CE(S, y) + CE(S.T, y)) / 2`` when M = B. Hard negatives
            have no query and get no passage→query term. Queries that share a positive passage
            count as each other's negatives there, as in CLIP. Needs ``in_batch=True``.
        normalize: cosine similarity (L2-normalise both sides) instead of the raw dot product.
        group_size: passages per query, G. Used for the default ``positive_index`` and for
            ``in_batch=False``; then M must equal B·G. Default M // B when M is a multiple of B
            (otherwise pass it or ``positive_index``).
        in_batch: every passage is a candidate for every query (in-batch negatives). False
            restricts each query's softmax to its own group (then ``positive_index[i]`` must lie
            in query i's group; ``gather`` has nothing to add and is ignored).
        gather: under ``torch.distributed``, all ranks' passages (and queries, when
            ``symmetric``) are candidates: the arguments are this rank's rows, positive indices
            are local and shifted by the passages of lower ranks, and the result is the loss of
            this rank's queries against the global batch. Backward sums, over ranks, the gradient
            every rank sends into each row and returns it to the rank that owns the row: each
            rank's inputs receive the gradient of Σ_ranks (the scalar each rank backpropagates),
            which is exactly the single-process gradient of the global batch. With the usual
            ``loss = infonce(...).mean()`` on each of W ranks and DDP's gradient averaging, the
            parameter gradients equal those of the global-batch mean. Ranks may hold different
            B and M (padded internally). Every rank must call it (a collective).
        backend: a key of ``BACKENDS``: "chunked" | "cpu" | "triton" (``linear_logprobs``'
            kernels) or "reference" (the materialising ``infonce_reference`` path). Default: by
            device (env ``FASTPREF_BACKEND`` overrides), picked once for both directions.

    Returns:
        ``[B]`` float32 (float64 for float64 inputs) loss per local query; the caller reduces.
    """
    q, p, pos, G = _prepare(
        queries, passages, positive_index, temperature, symmetric, normalize, group_size, in_batch
    )
    chosen = select_backend("infonce", queries.device, backend, BACKENDS)
    rows = BACKENDS[chosen]
    # Group-only: each softmax spans G passages; B·G scores are cheap to materialise.
    checked = not torch.compiler.is_compiling()  # _prepare checked positive_index eagerly
    opts = _Options(temperature, symmetric, None if in_batch else G, chosen, checked)
    if not in_batch:
        return rows(q, p, pos, q, 0, opts)
    q_all, q_offset, p_all, p_offset = q, 0, p, 0
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        p_all, p_offset = _all_gather_rows(p)
        if symmetric:  # the passage→query direction needs every rank's queries
            q_all, q_offset = _all_gather_rows(q)
    elif gather:
        raise RuntimeError(
            "infonce: gather=True needs an initialised torch.distributed "
            "process group (torch.distributed.init_process_group)"
        )
    return rows(q, p_all, pos + p_offset, q_all, q_offset, opts)


def infonce_reference(
    queries: Tensor,
    passages: Tensor,
    positive_index: Tensor | None = None,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    normalize: bool = True,
    group_size: int | None = None,
    in_batch: bool = True,
) -> Tensor:
    """``infonce`` by materialising the full B×M similarity matrix (ground truth for tests).

    ``F.cross_entropy(S / τ, pos, reduction="none")`` with ``S = q @ P.T`` (computed in the input
    dtype, like a trainer would), masked to each query's group when ``in_batch=False``; with
    ``symmetric`` averaged with ``F.cross_entropy(S[:, pos].T / τ, arange(B))``.
    """
    q, p, pos, G = _prepare(
        queries, passages, positive_index, temperature, symmetric, normalize, group_size, in_batch
    )
    opts = _Options(temperature, symmetric, None if in_batch else G, "reference", True)
    return _materialised_rows(q, p, pos, q, 0, opts)


# ---------------------------------------------------------------------------------------------
# the two ways of computing the rows: fused (never B×M) and materialised (reference)


def _fused_rows(
    q: Tensor, p: Tensor, pos: Tensor, q_all: Tensor, q_offset: int, o: _Options
) -> Tensor:
    """Loss rows of queries q against passages p (and q_all for the passage→query term)."""
    tau, group_size = o.temperature, o.group_size
    if group_size is not None:  # group-only softmax, [B, G] scores
        B, D = q.shape
        acc = accumulation_dtype(q.dtype)
        scores = torch.einsum("bd,bgd->bg", q.to(acc), p.to(acc).view(B, group_size, D)) / tau
        local = (pos - torch.arange(B, device=pos.device) * group_size)[:, None]
        return torch.logsumexp(scores, dim=-1) - scores.gather(1, local).squeeze(1)
    # positive_index was checked once (by _prepare, or by the op under torch.compile)
    # logits_budget=0: the scores stay tiled in the backward too (never B x M, even kept)
    kw = dict(backend=o.backend, temperature=tau, logits_budget=0)
    loss = -run_logprobs("linear_logprobs", q, p, pos, targets_checked=o.pos_checked, **kw)[0]
    if o.symmetric:  # the positives against every query: B×B_all, never materialised either
        labels = torch.arange(q.shape[0], device=q.device) + q_offset  # in range by construction
        back = run_logprobs("linear_logprobs", p[pos], q_all, labels, targets_checked=True, **kw)
        loss = 0.5 * (loss - back[0])
    return loss


def _materialised_rows(
    q: Tensor, p: Tensor, pos: Tensor, q_all: Tensor, q_offset: int, o: _Options
) -> Tensor:
    """``_fused_rows`` through the full similarity matrices."""
    tau, group_size = o.temperature, o.group_size
    acc = accumulation_dtype(q.dtype)
    logits = (q @ p.T).to(acc) / tau  # [B, M]
    if group_size is not None:
        B, M = logits.shape
        owner = torch.arange(M, device=q.device) // group_size
        own = owner[None, :] == torch.arange(B, device=q.device)[:, None]
        logits = logits.masked_fill(~own, float("-inf"))
    loss = F.cross_entropy(logits, pos, reduction="none")
    if o.symmetric:
        logits_t = (p[pos] @ q_all.T).to(acc) / tau  # [B, B_all] = S[:, pos].T
        labels = torch.arange(q.shape[0], device=q.device) + q_offset
        loss = 0.5 * (loss + F.cross_entropy(logits_t, labels, reduction="none"))
    return loss


# backend name -> the rows computation (the fused ones differ only in linear_logprobs' kernel)
BACKENDS = {
    "reference": _materialised_rows,
    **dict.fromkeys(("chunked", "cpu", "triton"), _fused_rows),
}


# ---------------------------------------------------------------------------------------------
# argument checks and the differentiable normalisation


def _prepare(
    queries: Tensor,
    passages: Tensor,
    positive_index: Tensor | None,
    temperature: float,
    symmetric: bool,
    normalize: bool,
    group_size: int | None,
    in_batch: bool,
) -> tuple[Tensor, Tensor, Tensor, int | None]:
    if queries.dim() != 2:
        raise ValueError(f"infonce: queries must be [B, D], got shape {tuple(queries.shape)}")
    if passages.dim() != 2:
        raise ValueError(f"infonce: passages must be [M, D], got shape {tuple(passages.shape)}")
    (B, D), (M, Dp) = queries.shape, passages.shape
    if D != Dp:
        raise ValueError(
            f"infonce: queries {tuple(queries.shape)} and passages "
            f"{tuple(passages.shape)} must have the same dimension D"
        )
    if queries.dtype != passages.dtype:
        raise TypeError(
            f"infonce: queries ({queries.dtype}) and passages ({passages.dtype}) "
            "must have the same dtype"
        )
    if not queries.is_floating_point():
        raise TypeError(f"infonce: queries must be floating point, got {queries.dtype}")
    if queries.device != passages.device:
        raise ValueError(
            f"infonce: queries ({queries.device}) and passages "
            f"({passages.device}) must be on the same device"
        )
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"infonce: temperature must be a finite number > 0, got {temperature}")
    if symmetric and not in_batch:
        raise ValueError(
            "infonce: symmetric=True needs in_batch=True (group-only would leave "
            "each positive passage a single candidate query)"
        )
    if M == 0 and B > 0:
        raise ValueError("infonce: passages is empty (M=0) but there are queries")

    if group_size is not None:
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"infonce: group_size must be an int >= 1, got {group_size!r}")
        if M != B * group_size:
            raise ValueError(
                f"infonce: group_size={group_size} needs B*group_size = "
                f"{B * group_size} passages, got M={M}"
            )
    elif positive_index is None or not in_batch:
        if B == 0 or M % B != 0:
            raise ValueError(
                f"infonce: passages (M={M}) are not a whole number of groups per "
                f"query (B={B}); pass group_size or positive_index"
            )
        group_size = M // B

    if positive_index is None:
        pos = torch.arange(B, device=queries.device) * group_size
    else:
        pos = _check_positive_index(positive_index, B, M, queries.device)
    if not in_batch and B > 0 and not torch.compiler.is_compiling():
        owner = pos // group_size
        expected = torch.arange(B, device=pos.device)
        bad = (owner != expected).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(
                f"infonce: positive_index[{i}] = {int(pos[i])} is outside query "
                f"{i}'s group [{i * group_size}, {(i + 1) * group_size}) "
                "(in_batch=False)"
            )

    q, p = queries, passages
    if normalize:  # in at least float32, then back to the input dtype for the kernel
        acc = accumulation_dtype(q.dtype)
        q = F.normalize(q.to(acc), dim=-1).to(q.dtype)
        p = F.normalize(p.to(acc), dim=-1).to(p.dtype)
    return q, p, pos, group_size


def _check_positive_index(positive_index: Tensor, B: int, M: int, device: torch.device) -> Tensor:
    if not isinstance(positive_index, Tensor) or positive_index.shape != (B,):
        shape = tuple(positive_index.shape) if isinstance(positive_index, Tensor) else None
        raise ValueError(f"infonce: positive_index must be a [B={B}] tensor, got shape {shape}")
    if positive_index.dtype.is_floating_point or positive_index.dtype == torch.bool:
        raise TypeError(f"infonce: positive_index must be integer, got {positive_index.dtype}")
    if positive_index.device != device:
        raise ValueError(
            f"infonce: positive_index is on {positive_index.device}, queries on {device}"
        )
    pos = positive_index.long()
    if torch.compiler.is_compiling():  # a data-dependent check would break the graph; the
        return pos  # kernel still rejects out-of-range targets at run time
    bad = ((pos < 0) | (pos >= M)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"infonce: positive_index[{i}] = {int(pos[i])} is outside [0, M={M})")
    return pos


# ---------------------------------------------------------------------------------------------
# cross-device negatives


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the gradient over ranks, keeps ours.

    Forward: ``cat([x_0, ..., x_{W-1}])`` (rows padded to the largest rank for the collective).
    Backward: every rank holds a gradient for every row (from its own loss), so the gradient of
    the sum of all ranks' losses with respect to this rank's rows is the all-reduced sum of
    those, sliced to our rows. (Replacing our slot by the local tensor instead would drop the
    other ranks' contributions to our rows.) Reduced in float32 for low-precision inputs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int) -> Tensor:  # type: ignore[override]
        width = max(sizes)
        if x.shape[0] == width:
            padded = x.contiguous()
        else:  # collectives need one shape on every rank: pad the short ranks
            padded = x.new_zeros((width, x.shape[1]))
            padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        total = grad.to(accumulation_dtype(grad.dtype)).contiguous().clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]].to(grad.dtype), None, None


def _all_gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' rows of ``x`` (differentiable) and the offset of this rank's first row."""
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return x, 0
    shape = torch.tensor([x.shape[0], x.shape[1]], device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    sizes = [int(s[0]) for s in shapes]
    dims = {int(s[1]) for s in shapes}
    if len(dims) != 1:
        raise ValueError(f"infonce: gather=True needs the same D on every rank, got {sorted(dims)}")
    return _AllGatherRows.apply(x, sizes, rank), sum(sizes[:rank])
