"""The kernels of ``linear_logprobs`` on compacted rows, as one table: backend name -> (fwd, bwd).

Every kernel takes rows whose targets were checked once upstream (``check_labels`` in
``fastpref.ops.linear_logprobs``), so the native ones are called with their own per-element
target scan off; they only compare targets with a tile's column range, never index with them.
fwd: ``(h, w, t, b, temperature, softcap, with_entropy, logits_budget) -> (logp, lse, entropy |
None, logits | None)``; bwd: ``(g, ge, h, w, t, b, lse, ent, temperature, softcap, nh, nw, nb,
logits) -> (dH, dW, db)``. ``logits`` are the kept logits of the three-GEMM path: only the C++
kernel keeps them (when they fit ``logits_budget`` bytes) and reads them back in the backward
instead of recomputing them; the chunked and Triton kernels always recompute (they return None).
"""

from __future__ import annotations

import torch

from fastpref.ops._linear_logprobs_chunked import chunked_bwd, chunked_fwd


def _cpu_fwd(h, w, t, b, temperature, softcap, with_entropy, logits_budget):
    logp, lse, ent, logits = torch.ops.fastpref_C.linear_logprobs_fwd(
        h, w, t, b, temperature, softcap or 0.0, with_entropy, False, logits_budget
    )  # check_targets=False: checked once, upstream
    return logp, lse, (ent if with_entropy else None), (logits if logits.numel() else None)


def _cpu_bwd(g, ge, h, w, t, b, lse, ent, temperature, softcap, nh, nw, nb, logits):
    return torch.ops.fastpref_C.linear_logprobs_bwd(
        g, ge, h, w, t, b, lse, ent, temperature, softcap or 0.0, nh, nw, nb, False, logits
    )


def _chunked_fwd(h, w, t, b, temperature, softcap, with_entropy, logits_budget):
    return (*chunked_fwd(h, w, t, b, temperature, softcap, with_entropy), None)


def _chunked_bwd(g, ge, h, w, t, b, lse, ent, temperature, softcap, nh, nw, nb, logits):
    return chunked_bwd(g, ge, h, w, t, b, lse, ent, temperature, softcap, nh, nw, nb)


def _triton_fwd(h, w, t, b, temperature, softcap, with_entropy, logits_budget):
    if with_entropy:  # the Triton launcher computes log-probs only
        return _chunked_fwd(h, w, t, b, temperature, softcap, with_entropy, logits_budget)
    from fastpref.kernels.linear_logprobs import linear_logprobs_fwd

    logp, lse = linear_logprobs_fwd(h, w, t, b, temperature, softcap, check_targets=False)
    return logp, lse, None, None


def _triton_bwd(g, ge, h, w, t, b, lse, ent, temperature, softcap, nh, nw, nb, logits):
    if ge is not None or g is None:
        return chunked_bwd(g, ge, h, w, t, b, lse, ent, temperature, softcap, nh, nw, nb)
    from fastpref.kernels.linear_logprobs import linear_logprobs_bwd

    return linear_logprobs_bwd(
        g.float(), h, w, t, b, lse.float(), temperature, softcap, nh, nw, nb, check_targets=False
    )


KERNELS = {
    "chunked": (_chunked_fwd, _chunked_bwd),
    "cpu": (_cpu_fwd, _cpu_bwd),
    "triton": (_triton_fwd, _triton_bwd),
}
