"""Fused linear log-probs in Triton (Cut Cross-Entropy style): the launchers ``fastpref.ops`` calls.

What is fused
    logits = hidden @ weight.T (+ bias), the optional softcap ``softcap * tanh(z / softcap)``,
    the temperature ``z / temperature``, the log-sum-exp over the vocabulary and the pick of
    the target logit: forward returns ``logp = z[target] - lse`` and ``lse`` per row. Backward
    recomputes the logits tile by tile and turns them straight into
    ``G = grad_logp * (onehot(target) - softmax(z))``, chained through temperature and softcap,
    then into ``dH = G @ W``, ``dW = G.T @ H`` and ``db = G.sum(0)``. The ``N x V`` logits and
    probabilities are never materialised.

One kernel (or one scheme) per file, as in Cut Cross-Entropy's ``cce_lse_forward.py`` /
``cce_backward.py``:
    ``linear_logprobs_common``       the logits tile, its gradient, block sizes, input checks
    ``linear_logprobs_fwd``          forward (online log-sum-exp), ``linear_logprobs_fwd``
    ``linear_logprobs_bwd_fused``    backward for ``D <= BLOCK_DO`` (default 128): no extra memory
    ``linear_logprobs_bwd_chunked``  backward for wider ``D``: the 4-GEMM floor, bounded chunk
This module picks the backward scheme. Both are deterministic (no atomics, fixed summation
order, bitwise reproducible); every tile product accumulates in fp32.

On CPU tensors these kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported),
which is how the test suite verifies them.
"""

from __future__ import annotations

import torch

from fastpref.kernels.linear_logprobs_bwd_chunked import (
    _linear_logprobs_bwd_dlogits_kernel,
    linear_logprobs_bwd_chunked,
)
from fastpref.kernels.linear_logprobs_bwd_fused import (
    _linear_logprobs_bwd_dh_kernel,
    _linear_logprobs_bwd_dw_kernel,
    linear_logprobs_bwd_fused,
)
from fastpref.kernels.linear_logprobs_common import (
    block,
    check_inputs,
    check_row_vector,
    on_inputs_device,
)
from fastpref.kernels.linear_logprobs_fwd import _linear_logprobs_fwd_kernel, linear_logprobs_fwd

__all__ = [
    "_linear_logprobs_bwd_dh_kernel",
    "_linear_logprobs_bwd_dlogits_kernel",
    "_linear_logprobs_bwd_dw_kernel",
    "_linear_logprobs_fwd_kernel",
    "linear_logprobs_bwd",
    "linear_logprobs_fwd",
]


@on_inputs_device
def linear_logprobs_bwd(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    temperature: float,
    softcap: float | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    *,
    mode: str | None = None,
    chunk_bytes: int = 256 << 20,
    block_n: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    block_do: int | None = None,
    check_targets: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)`` w.r.t. hidden, weight and bias, recomputing logits.

    With ``G = grad_logp[:, None] * (onehot(targets) - softmax(z)) * dz/du`` (``u`` the raw
    logits, ``dz/du = (1 - tanh(u / softcap)^2) / temperature``): ``d_hidden = G @ weight``,
    ``d_weight = G.T @ hidden``, ``d_bias = G.sum(0)``, each in its input's dtype with fp32
    accumulation; None where not needed. ``lse`` is the forward's. Deterministic (no atomics).
    Equals autograd through the plain-PyTorch forward in ``linear_logprobs_fwd``'s docstring.
    ``mode`` is "fused" or "chunked" (module docstring); None picks fused iff ``D <= BLOCK_DO``.
    ``chunk_bytes`` bounds the chunked mode's ``G`` buffer; ``block_*`` override tile sizes;
    ``check_targets=False`` skips the target range scan for callers that did it (fastpref.ops).
    """
    N, D, V = check_inputs(hidden, weight, targets, bias, temperature, softcap, check_targets)
    grad_logp = check_row_vector("grad_logp", grad_logp, N, hidden.device)
    lse = check_row_vector("lse", lse, N, hidden.device)
    if need_bias and bias is None:
        raise ValueError("need_bias=True but bias is None")
    if mode not in (None, "fused", "chunked"):
        raise ValueError(f"mode must be None, 'fused' or 'chunked', got {mode!r}")
    if N == 0:  # nothing to launch: zero gradients
        d_hidden = hidden.new_zeros(hidden.shape) if need_hidden else None
        d_weight = weight.new_zeros(weight.shape) if need_weight else None
        d_bias = bias.new_zeros(V) if need_bias else None
        return d_hidden, d_weight, d_bias
    BLOCK_DO = block(D, block_do, 128)
    if mode is None:
        mode = "fused" if D <= BLOCK_DO else "chunked"
    args = (grad_logp, hidden, weight, targets, bias, lse, temperature, softcap)
    needs = (need_hidden, need_weight, need_bias)
    blocks = dict(block_n=block_n, block_v=block_v, block_d=block_d)
    if mode == "chunked":
        return linear_logprobs_bwd_chunked(*args, *needs, chunk_bytes=chunk_bytes, **blocks)
    return linear_logprobs_bwd_fused(*args, *needs, BLOCK_DO=BLOCK_DO, **blocks)
