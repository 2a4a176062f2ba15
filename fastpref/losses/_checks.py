"""Argument checks shared by the objectives.

Only shapes and Python-number hyperparameters are checked: checking tensor *values* would
force a device sync on every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def check_inputs(
    inputs: object,
    expected: type,
    loss: str,
    required: Sequence[str],
    *,
    ndim: int = 1,
) -> None:
    """``inputs`` is an ``expected``; the ``required`` fields are tensors and every tensor field
    has the shape of the first required one (``ndim`` dimensions)."""
    if not isinstance(inputs, expected):
        raise TypeError(f"{loss}: inputs must be {expected.__name__}, got {type(inputs).__name__}")
    cls = expected.__name__
    for name in required:
        if getattr(inputs, name) is None:
            raise ValueError(f"{loss}: {cls}.{name} is required (got None)")
    first = required[0]
    shape = getattr(inputs, first).shape
    if len(shape) != ndim:
        dims = "[B]" if ndim == 1 else "[B,K]"
        raise ValueError(f"{loss}: {cls}.{first} must have shape {dims}, got {tuple(shape)}")
    for name, value in vars(inputs).items():
        if isinstance(value, Tensor) and value.shape != shape:
            raise ValueError(
                f"{loss}: {cls}.{name} has shape {tuple(value.shape)}, expected "
                f"{tuple(shape)} like {cls}.{first}"
            )


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_finite(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_label_smoothing(value: float) -> None:
    """ε is the assumed probability that a preference label is flipped: ε ∈ [0, 0.5)."""
    if not (isinstance(value, (int, float)) and 0.0 <= value < 0.5):
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {value!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
