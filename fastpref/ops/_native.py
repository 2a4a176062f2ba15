"""Loads the compiled extension ``fastpref._C`` once and remembers why it failed, if it did."""

from __future__ import annotations

import warnings

try:
    from fastpref import _C  # noqa: F401  (importing registers torch.ops.fastpref_C.*)

    NATIVE_ERROR: str | None = None
except ImportError as exc:  # a source checkout that was never built, or a broken build
    _C = None
    NATIVE_ERROR = (
        f"fastpref._C could not be imported ({exc}); "
        "build it with `pip install --no-build-isolation -e .`"
    )

_warned: set[str] = set()


def native_available() -> bool:
    """True when the C++ (and, in a CUDA build, CUDA) kernels are importable."""
    return _C is not None


def cuda_kernels_built() -> bool:
    """True when fastpref._C was compiled with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def warn_once(key: str, message: str) -> None:
    """One warning per distinct fallback for the life of the process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def release_kernel_buffers() -> int:
    """Give the C++ kernels' recycled large buffers back to the system; returns their bytes.

    The CPU kernels keep up to 4 freed buffers of >= 4 MiB (the kept logits and dW of
    ``linear_logprobs``, at most 2 GiB together) for their next call, which would otherwise pay a
    page fault for every page of a fresh one. Call this when no more such calls follow (the
    trainer does before its final save)."""
    if _C is None:
        return 0
    import torch

    return int(torch.ops.fastpref_C.release_large_buffers())
