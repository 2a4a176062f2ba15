"""Fused linear log-probabilities: ``log softmax(f(H @ W.T + b))[target]`` without the N x V logits.

Logits ``z = hidden @ weight.T + bias``, then ``softcap * tanh(z / softcap)`` when a softcap is
set, then ``z / temperature`` (the order Gemma 2 and the DPO trainers use). Per row:
``lse = logsumexp(z)``, ``logp = z[target] - lse``, ``entropy = lse - sum_v softmax(z)_v z_v``.
The algorithm is Cut Cross-Entropy's (Wijmans et al., https://arxiv.org/abs/2411.09009): rows
whose target is ``ignore_index`` are dropped before any GEMM, rows x vocab tiles with an online
log-sum-exp, only ``lse`` saved, and a backward that recomputes each tile: four GEMMs (logits,
their recompute, dH, dW). Three when the kept rows' logits fit ``FASTPREF_LOGITS_BUDGET``
(``logits_budget_for``): the C++ kernel then keeps its forward GEMM tiles for the backward
instead of recomputing them (same values bit for bit); the chunked and Triton kernels always
recompute.

Layers (STYLE.md): ``linear_logprobs_reference`` (materialises the logits, ground truth);
kernels on compacted rows (``_IMPLS``) -- ``chunked`` (PyTorch, ``_linear_logprobs_chunked``),
``cpu`` (``csrc/cpu/linear_logprobs.cpp``), ``triton`` (``fastpref.kernels.linear_logprobs``); the
``torch.library`` ops ``fastpref::linear_logprobs_fwd/_bwd`` (compaction, the target check,
kernel call, scatter back; opaque to torch.compile); the autograd Function; ``BACKENDS`` (backend
name -> implementation, picked by one ``select_backend`` call); the public functions.

Targets are range-checked once per call, before any memory is touched: by ``check_labels`` in the
forward op (at the caller's row positions, so also under torch.compile), or earlier by a caller
that names positions in its own layout (``sequence_logprobs``, ``infonce``) and says so with
``targets_checked=True``. The backward op reuses the forward's targets unchecked, and no
kernel scans them again: the kernels only compare a target with their tile's column range.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.constants import IGNORE_INDEX, accumulation_dtype
from fastpref.errors import ConfigError
from fastpref.ops._dispatch import select_backend
from fastpref.ops._linear_logprobs_kernels import KERNELS as _IMPLS

__all__ = [
    "linear_logprobs",
    "sequence_logprobs",
    "linear_entropy",
    "linear_logprobs_reference",
    "linear_entropy_reference",
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

LOGITS_BUDGET_ENV = "FASTPREF_LOGITS_BUDGET"
# default budget of the kept logits (see logits_budget_for)
_BUDGET_DEFAULT = 256 * 2**20


@dataclass(frozen=True)
class LogitOptions:
    """Non-tensor options of one call; travels through the autograd Function as one value."""

    ignore_index: int = IGNORE_INDEX  # target value of rows that get logp = 0 and no gradient
    temperature: float = 1.0  # logits are divided by it (after the softcap)
    softcap: float | None = None  # softcap * tanh(z / softcap) when set
    with_entropy: bool = False  # also compute the per-row entropy
    backend: str = "chunked"  # a resolved backend name (never None)
    targets_checked: bool = False  # the caller already ran check_labels on these targets
    logits_budget: int = 0  # bytes the backward may keep of the logits (0: recompute them)


def logits_budget_for(weight: Tensor) -> int:
    """Bytes of kept logits that buy the three-GEMM backward (0: always recompute).

    ``FASTPREF_LOGITS_BUDGET`` (a byte count, ``0`` disables) when set, else 256 MiB. The DPO
    bench step (1015 kept rows, D 256) keeps its logits at vocab 32k (130 MB fp32) and recomputes
    them at 128k (525 MB): there the kept path measured no faster in the trainer's step (its
    forward slowed, 0.23-0.94 s against 0.19-0.21 s) and raised the peak by ~456 MB
    (bench/README.md), so the default no longer scales with the lm_head (it was
    ``max(4 * weight bytes, 256 MiB)``).
    The C++ kernel keeps ``rows x V`` values in the input dtype from the forward until the
    backward has run (``rows`` = the kept rows, the last block padded to 64).
    """
    raw = os.environ.get(LOGITS_BUDGET_ENV)
    if raw is None or raw.strip() == "":
        return _BUDGET_DEFAULT
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(
            f"{LOGITS_BUDGET_ENV}={raw!r}: expected a byte count >= 0 (e.g. 536870912 for "
            f"512 MiB; 0 recomputes the logits in the backward), or unset for the default"
        )
    return value


# ----------------------------------------------------------------------------------------------
# reference


def _reference_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, softcap: float | None
) -> Tensor:
    z = F.linear(hidden, weight, bias).float()  # [N, V], in the input dtype, then fp32
    if hidden.dtype == torch.float64:
        z = z.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def linear_logprobs_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """``linear_logprobs`` in plain PyTorch; materialises the N x V logits (tests only)."""
    opts = LogitOptions(ignore_index, temperature, softcap)
    return _materialised(hidden, weight, targets, bias, opts)[0]


def linear_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """``linear_entropy`` in plain PyTorch; materialises the N x V logits (tests only)."""
    opts = LogitOptions(ignore_index, temperature, softcap, with_entropy=True)
    return _materialised(hidden, weight, targets, bias, opts)[1]


def check_labels(
    labels: Tensor, vocab: int, ignore_index: int, caller: str, *, name: str = "labels"
) -> None:
    """ValueError naming the first ``labels[...]`` outside ``[0, vocab)`` that is not ignored.

    The one range scan of linear_logprobs' targets (any shape; the position is named in the
    tensor's own indices, e.g. ``labels[b, t]``); everything below it trusts the targets.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{caller}: {name}[{', '.join(map(str, at))}] = {int(labels[at])} is outside "
            f"[0, {vocab}) and is not ignore_index={ignore_index}"
        )


# ----------------------------------------------------------------------------------------------
# torch.library ops: full-size inputs in, full-size outputs out (ignored rows are zeros)


def _kept_rows(targets: Tensor, ignore_index: int) -> Tensor | None:
    """Indices of the non-ignored rows (None when every row is kept)."""
    keep = targets != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero()[:, 0]


def _take(x: Tensor | None, rows: Tensor | None) -> Tensor | None:
    return x if x is None or rows is None else x.index_select(0, rows)


def _scatter(x: Tensor, rows: Tensor | None, n: int) -> Tensor:
    if rows is None:
        return x
    return x.new_zeros((n, *x.shape[1:])).index_copy_(0, rows, x)


@torch.library.custom_op("fastpref::linear_logprobs_fwd", mutates_args=())
def _fwd_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
    backend: str,
    targets_checked: bool = False,
    logits_budget: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logp[N], lse[N], entropy[N] or [0], kept logits or [0]); 0 on ignored rows.

    logp, lse and entropy in fp32 (fp64 for fp64). The kept logits are the kernel's own buffer
    for the backward (the compacted rows' GEMM tiles), returned only where the kernel keeps them
    (``cpu``) and they fit ``logits_budget`` bytes. Checks the targets unless
    ``targets_checked`` (the caller ran ``check_labels``).
    """
    acc = accumulation_dtype(hidden.dtype)
    N = hidden.shape[0]
    if not targets_checked:
        check_labels(targets, weight.shape[0], ignore_index, "linear_logprobs", name="targets")
    rows = _kept_rows(targets, ignore_index)
    logp = hidden.new_zeros((N,), dtype=acc)
    lse = hidden.new_zeros((N,), dtype=acc)
    ent = hidden.new_zeros((N if with_entropy else 0,), dtype=acc)
    n_kept = N if rows is None else rows.numel()
    none = hidden.new_empty((0,))
    if n_kept == 0:
        return logp, lse, ent, none
    h = _take(hidden, rows).contiguous()
    t = _take(targets, rows).long().contiguous()
    fwd, _ = _IMPLS[backend]
    lp_k, lse_k, ent_k, logits = fwd(
        h, weight.contiguous(), t, bias, temperature, softcap, with_entropy, logits_budget
    )
    logp, lse = _scatter(lp_k.to(acc), rows, N), _scatter(lse_k.to(acc), rows, N)
    if with_entropy:
        ent = _scatter(ent_k.to(acc), rows, N)
    return logp, lse, ent, none if logits is None else logits


@_fwd_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, temperature, softcap, with_entropy, backend,
      targets_checked=False, logits_budget=0):  # fmt: skip
    acc = accumulation_dtype(hidden.dtype)
    N = hidden.shape[0]
    kept = torch.library.get_ctx().new_dynamic_size() if logits_budget > 0 else 0
    return (
        hidden.new_empty((N,), dtype=acc),
        hidden.new_empty((N,), dtype=acc),
        hidden.new_empty((N if with_entropy else 0,), dtype=acc),
        hidden.new_empty((kept,)),
    )


@torch.library.custom_op("fastpref::linear_logprobs_bwd", mutates_args=())
def _bwd_op(
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dH, dW, db); a gradient that is not needed comes back as an empty [0] tensor.

    ``targets`` are the forward's, which checked them; they are not scanned again. ``logits``:
    the forward's kept logits (then the backward does not recompute them), or None / empty.
    """
    N = hidden.shape[0]
    rows = _kept_rows(targets, ignore_index)
    n_kept = N if rows is None else rows.numel()
    dh = dw = db = None
    if n_kept > 0:
        _, bwd = _IMPLS[backend]
        dh, dw, db = bwd(
            _take(grad_logp, rows),
            _take(grad_entropy, rows),
            _take(hidden, rows).contiguous(),
            weight.contiguous(),
            _take(targets, rows).long().contiguous(),
            bias,
            _take(lse, rows),
            _take(entropy, rows),
            temperature,
            softcap,
            need_hidden,
            need_weight,
            need_bias and bias is not None,
            logits if logits is not None and logits.numel() > 0 else None,
        )
    if need_hidden:
        dh = torch.zeros_like(hidden) if dh is None else _scatter(dh.to(hidden.dtype), rows, N)
    if need_weight:
        dw = torch.zeros_like(weight) if dw is None else dw.to(weight.dtype)
    if need_bias and bias is not None:
        db = torch.zeros_like(bias) if db is None else db.to(bias.dtype)
    return (
        dh if need_hidden else hidden.new_empty((0,)),
        dw if need_weight else hidden.new_empty((0,)),
        db if need_bias and bias is not None else hidden.new_empty((0,)),
    )


@_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, ignore_index,
      temperature, softcap, need_hidden, need_weight, need_bias, backend, logits=None):  # fmt: skip
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty((0,)),
        torch.empty_like(weight) if need_weight else hidden.new_empty((0,)),
        torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty((0,)),
    )


# ----------------------------------------------------------------------------------------------
# autograd


class _LinearLogprobs(torch.autograd.Function):
    """(logp[N], entropy[N] or [0]) with gradients for hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, opts: LogitOptions):
        logp, lse, ent, logits = torch.ops.fastpref.linear_logprobs_fwd(
            hidden, weight, targets, bias, opts.ignore_index, opts.temperature, opts.softcap,
            opts.with_entropy, opts.backend, opts.targets_checked, opts.logits_budget,
        )  # fmt: skip
        ctx.opts = opts
        # logits: the kept logits of the three-GEMM path, or [0] (the backward recomputes them);
        # saved like the rest, so they are freed once the backward has run
        ctx.save_for_backward(hidden, weight, targets, bias, lse, ent, logits)
        ctx.mark_non_differentiable(lse)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, bias, lse, ent, logits = ctx.saved_tensors
        o: LogitOptions = ctx.opts
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        dh, dw, db = torch.ops.fastpref.linear_logprobs_bwd(
            grad_logp, grad_entropy if o.with_entropy else None, hidden, weight, targets, bias,
            lse, ent if o.with_entropy else None, o.ignore_index, o.temperature, o.softcap,
            need_h, need_w, need_b and bias is not None, o.backend,
            logits if logits.numel() > 0 else None,
        )  # fmt: skip
        return (
            dh if need_h else None,
            dw if need_w else None,
            None,
            db if need_b and bias is not None else None,
            None,
        )


# ----------------------------------------------------------------------------------------------
# backends: name -> (hidden, weight, targets, bias, opts) -> (logp[N], entropy[N] or [0])


def _fused(hidden, weight, targets, bias, opts: LogitOptions) -> tuple[Tensor, Tensor]:
    """The tiled kernels ``_IMPLS[opts.backend]`` through the registered ops."""
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return _LinearLogprobs.apply(hidden, weight, targets, bias, opts)
    # no graph to build (e.g. a reference model under torch.no_grad): nothing is saved or kept
    logp, _, ent, _ = torch.ops.fastpref.linear_logprobs_fwd(
        hidden, weight, targets, bias, opts.ignore_index, opts.temperature, opts.softcap,
        opts.with_entropy, opts.backend, opts.targets_checked,
    )  # fmt: skip
    return logp, ent


def _materialised(hidden, weight, targets, bias, opts: LogitOptions) -> tuple[Tensor, Tensor]:
    """The reference: the N x V logits in memory (checks the targets unless already checked)."""
    if not opts.targets_checked:
        check_labels(targets, weight.shape[0], opts.ignore_index, "linear_logprobs", name="targets")
    keep = targets != opts.ignore_index
    z = _reference_logits(hidden, weight, bias, opts.temperature, opts.softcap)
    if opts.with_entropy:
        ent = torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
        return z.new_zeros((0,)), torch.where(keep, ent, 0.0)
    picked = z.log_softmax(-1).gather(-1, torch.where(keep, targets, 0)[:, None])[:, 0]
    return torch.where(keep, picked, 0.0), z.new_zeros((0,))


BACKENDS = {"reference": _materialised, **dict.fromkeys(_IMPLS, _fused)}


# ----------------------------------------------------------------------------------------------
# public API


def _check(
    name: str,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    temperature: float,
    softcap: float | None,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: hidden must be [N, D] and weight [V, D] with the same D; got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"{name}: targets must be [N] = [{hidden.shape[0]}] to match hidden "
            f"{tuple(hidden.shape)}; got targets {tuple(targets.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"{name}: bias must be [V] = [{weight.shape[0]}] to match weight "
            f"{tuple(weight.shape)}; got bias {tuple(bias.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in _DTYPES:
        raise TypeError(
            f"{name}: hidden and weight must share a floating dtype; got hidden {hidden.dtype} "
            f"and weight {weight.dtype}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: targets must be int64 or int32; got {targets.dtype}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"{name}: bias must be floating point; got {bias.dtype}")
    for other, x in (("weight", weight), ("targets", targets), ("bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name}: hidden is on {hidden.device} but {other} is on {x.device}")
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0; got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap must be > 0 or None; got {softcap}")


def run_logprobs(
    name: str,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    backend: str | None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    with_entropy: bool = False,
    targets_checked: bool = False,
    logits_budget: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(logp[N], entropy[N] or [0]): the argument checks, one ``select_backend``, the backend.

    The public functions and the ops built on this one (``sequence_logprobs``, ``infonce``) call
    it; those may check the targets themselves and pass ``targets_checked=True``.
    ``logits_budget``: None reads ``FASTPREF_LOGITS_BUDGET`` (or the default, see
    ``logits_budget_for``); an op that promises never to hold N x V values passes 0.
    """
    _check(name, hidden, weight, targets, bias, temperature, softcap)
    chosen = select_backend(name, hidden.device, backend, BACKENDS)
    softcap = None if softcap is None else float(softcap)
    # the three-GEMM path in eager mode (torch.compile traces the recomputing one)
    if torch.compiler.is_compiling():
        budget = 0
    elif logits_budget is None:
        budget = logits_budget_for(weight)
    else:
        budget = int(logits_budget)
    opts = LogitOptions(
        int(ignore_index), float(temperature), softcap, with_entropy, chosen, targets_checked,
        budget,
    )  # fmt: skip
    return BACKENDS[chosen](hidden, weight, targets, bias, opts)


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Log-probability of each target, ``[N]`` float32 (float64 for float64), 0 where ignored.

    ``z = hidden @ weight.T + bias``; ``z = softcap * tanh(z / softcap)`` if softcap;
    ``z = z / temperature``; ``logp_i = z_i[y_i] - logsumexp_v z_iv``. The fused algorithm is Cut
    Cross-Entropy's (https://arxiv.org/abs/2411.09009). Equals
    ``(hidden @ weight.T + bias).float().log_softmax(-1).gather(-1, y[:, None])[:, 0]`` (with the
    softcap and temperature) without allocating the N x V logits: rows with
    ``y == ignore_index`` never enter a GEMM, and the extra memory is one logits tile per thread
    (the C++ kernel: 512 x 256 x 4 bytes) plus O(N) row state -- with ``FASTPREF_LOGITS_BUDGET=0``;
    by default see the next paragraph.

    Differentiable in ``hidden``, ``weight`` and ``bias`` for any upstream gradient; the backward
    recomputes the logits tile by tile, or (the C++ backend, when the kept rows' logits fit
    ``FASTPREF_LOGITS_BUDGET`` bytes, default 256 MiB) reads the forward's,
    kept (kept rows x V in the input dtype) until the backward has run: three GEMMs instead of
    four, the same gradients. Under ``torch.no_grad()`` nothing is kept.

    Args:
        hidden: ``[N, D]`` float32 / bfloat16 (float16 on GPU, float64 for checks).
        weight: ``[V, D]``, same dtype and device.
        targets: ``[N]`` int64 in ``[0, V)`` or ``ignore_index``; anything else is a ValueError
            naming the first bad position.
        bias: optional ``[V]``.
        backend: "reference" | "chunked" | "cpu" | "triton"; default by device (env
            ``FASTPREF_BACKEND`` overrides).
    """
    return run_logprobs(
        "linear_logprobs", hidden, weight, targets, bias, backend=backend,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap,
    )[0]  # fmt: skip


def linear_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Entropy of each row's softmax, ``[N]`` float32 (float64 for float64), 0 where ignored.

    ``H_i = -sum_v p_iv log p_iv = lse_i - sum_v p_iv z_iv`` with ``p = softmax(z)`` and ``z`` the
    logits of ``linear_logprobs`` (same bias, softcap, temperature). ``targets`` only selects the
    rows (``ignore_index`` rows are skipped). Equals
    ``torch.distributions.Categorical(logits=z).entropy()`` without the N x V logits; the online
    form keeps ``sum exp(z - m) (z - m)`` so no two large numbers cancel. The ``triton`` backend
    computes it with the chunked PyTorch code (its kernels do log-probs only).
    """
    return run_logprobs(
        "linear_entropy", hidden, weight, targets, bias, backend=backend,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, with_entropy=True,
    )[1]  # fmt: skip


def sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    average: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Sum (``average=True``: mean) of the token log-probs of each sequence, ``[B]`` float32.

    ``s_b = sum_t logp(labels[b, t] | hidden[b, t])`` over the tokens whose label is not
    ``ignore_index`` (the mean divides by their count, 0 for a sequence without any). Labels are
    aligned with ``hidden`` (no shift inside). The sequence log-likelihood of DPO
    (https://arxiv.org/abs/2305.18290) and SimPO's average (https://arxiv.org/abs/2405.14734).
    Equals ``linear_logprobs(hidden.flatten(0, 1), weight, labels.flatten()).view(B, T).sum(1)``.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"sequence_logprobs: hidden must be [B, T, D] and labels [B, T]; got hidden "
            f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}"
        )
    B, T, D = hidden.shape
    # The one target check: here in eager mode, naming the (b, t) of a bad label; under
    # torch.compile (a data-dependent branch would break the graph) the op does it.
    checked = not torch.compiler.is_compiling()
    if checked:
        V = weight.shape[0] if weight.dim() == 2 else 0
        check_labels(labels, V, ignore_index, "sequence_logprobs")
    logp = run_logprobs(
        "linear_logprobs", hidden.reshape(B * T, D), weight, labels.reshape(B * T), bias,
        backend=backend, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        targets_checked=checked,
    )[0].view(B, T)  # fmt: skip
    total = logp.sum(1)
    if not average:
        return total
    count = (labels != ignore_index).sum(1).clamp(min=1)
    return total / count
