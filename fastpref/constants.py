"""Constants and rules every layer shares, each defined once (imports nothing of fastpref)."""

from __future__ import annotations

import torch

__all__ = ["IGNORE_INDEX", "accumulation_dtype"]

IGNORE_INDEX = -100
"""Label of a position that is not scored (prompt, padding), as in PyTorch's cross-entropy."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and gradients accumulate in: float64 for float64 inputs, else float32
    (bf16/fp16 inputs accumulate in fp32 so that long reductions do not lose their tail)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
