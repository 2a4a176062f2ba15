"""One optimizer step: the task's micro-steps, backward and DeepSpeed's step, then the step's
metrics reduced over micro-steps and ranks with one all-reduce.

A step whose loss or gradient norm is not finite (on any rank) updates nothing: the optimizer's
update is skipped (the gradients are still cleared and the schedule advances), and the record
says ``skipped``; what to do next is the loop's ``--nan-policy``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

__all__ = ["StepRecord", "run_step"]


@dataclass
class StepRecord:
    """What one optimizer step reports (means over micro-steps and ranks)."""

    loss: float
    means: dict[str, float]  # every metric, "loss" included
    grad_norm: float
    tokens: float  # trained tokens over all ranks
    skipped: bool = False  # a non-finite loss or gradient: no update was made

    def as_dict(self, step: int, epoch: float, lr: float, t0: float) -> dict[str, float]:
        """The metrics-log record of step ``step`` that started at ``perf_counter() == t0``."""
        elapsed = time.perf_counter() - t0
        out = {
            "step": step,
            **self.means,
            "epoch": epoch,
            "grad_norm": self.grad_norm,
            "lr": lr,
            "tokens": self.tokens,
            "tokens/s": self.tokens / elapsed,
        }
        if self.skipped:
            out["skipped"] = True
        return out


def _reduce_mean(
    values: dict[str, list[torch.Tensor]], tokens: torch.Tensor, world_size: int
) -> tuple[dict[str, float], float]:
    """NaN-aware mean of each metric over micro-steps and ranks, and the total token count:
    one all-reduce and one host sync per step (metrics stay on the device until here)."""
    keys = sorted(values)
    stacked = torch.stack([torch.stack([v.float() for v in values[k]]) for k in keys])  # [K, M]
    finite = torch.isfinite(stacked)
    sums = torch.stack([torch.where(finite, stacked, 0.0).sum(1), finite.sum(1).float()], 1)
    packed = torch.cat([sums.double().flatten(), tokens.double().view(1)])
    if world_size > 1:
        torch.distributed.all_reduce(packed)
    *flat, total_tokens = packed.tolist()
    means = {
        k: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else float("nan")
        for i, k in enumerate(keys)
    }
    return means, total_tokens


def _grad_norm_now(engine) -> float | None:
    grads = [
        p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None
    ]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None


def run_step(task, engine, batches: list[dict], world_size: int, norm_before_step: bool):
    """Forward/backward every micro-batch of ``batches`` and step; returns a :class:`StepRecord`.

    ``norm_before_step``: read the gradient norm before DeepSpeed's step (where neither ZeRO nor
    the fused optimizer reports it).
    """
    values: dict[str, list[torch.Tensor]] = {}
    tokens = torch.zeros((), device=engine.device)
    pre_norm, bad = None, False
    for micro, batch in enumerate(batches):
        result = task.step(engine, batch, "train")
        engine.backward(result.loss)
        for k, v in {"loss": result.loss.detach(), **result.metrics}.items():
            values.setdefault(k, []).append(v)
        tokens = tokens + result.tokens
        last = micro == len(batches) - 1
        if last:  # before the update: is anything this step computed not finite?
            if norm_before_step:
                pre_norm = _grad_norm_now(engine)
            bad = _any_rank(not _finite(values["loss"], pre_norm), world_size)
        with _no_update(engine) if last and bad else contextlib.nullcontext():
            engine.step()
    bad = bad or bool(getattr(engine.optimizer, "nonfinite", False))
    grad_norm = engine.get_global_grad_norm()  # ClippedAdamW's, or ZeRO's
    means, total = _reduce_mean(values, tokens, world_size)
    norm = float(grad_norm) if grad_norm is not None else (pre_norm or float("nan"))
    return StepRecord(loss=means["loss"], means=means, grad_norm=norm, tokens=total, skipped=bad)


def _finite(losses: list[torch.Tensor], norm: float | None) -> bool:
    return bool(torch.isfinite(torch.stack(losses)).all()) and (norm is None or math.isfinite(norm))


def _any_rank(flag: bool, world_size: int) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks skip together)."""
    if world_size == 1:
        return flag
    t = torch.tensor([float(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


@contextlib.contextmanager
def _no_update(engine):
    """DeepSpeed's step (gradients cleared, schedule and counters advanced) without the
    optimizer's update."""
    optimizer = engine.optimizer
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step
