"""Backend selection shared by every fused op.

Order of precedence: the op's ``backend=`` argument, then the ``FASTPREF_BACKEND`` environment
variable, then the default for the device (``cpu`` = the C++ kernels on CPU tensors, ``triton``
on CUDA tensors). A backend whose native build or package is missing falls back to ``chunked``
with one warning that names the reason: never silently, never wrong.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable

import torch

from fastpref.ops._native import NATIVE_ERROR, cuda_kernels_built, native_available, warn_once

ENV_VAR = "FASTPREF_BACKEND"
ALL_BACKENDS = ("reference", "chunked", "cpu", "triton", "cuda")


def _triton_error(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the `triton` package is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels need CUDA tensors (got {device.type}) or TRITON_INTERPRET=1"
    return None


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "cpu":
        if device.type != "cpu":
            return f"the C++ CPU kernels need CPU tensors (got {device.type})"
        return None if native_available() else NATIVE_ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors (got {device.type})"
        return None if cuda_kernels_built() else "fastpref._C was built without its CUDA kernels"
    if backend == "triton":
        return _triton_error(device)
    return None


def select_backend(
    op: str, device: torch.device, requested: str | None, supported: Iterable[str]
) -> str:
    """Return the name of the backend ``op`` runs with on ``device``.

    ``supported`` names the backends this op implements: every op passes its ``BACKENDS`` table
    (backend name -> implementation) and then calls ``BACKENDS[name]``. An explicit ``requested``
    backend the op does not implement is an error; one set through ``FASTPREF_BACKEND`` that the
    op lacks is ignored with a warning (the variable applies to every op, not all of which have
    every backend). An explicit ``requested`` backend that is implemented but not usable here
    (the native build missing, no GPU) is an error too; a default or ``FASTPREF_BACKEND`` choice
    falls back to the chunked backend with one warning.
    """
    supported = tuple(supported)
    from_env = False
    explicit = requested is not None
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        from_env = requested is not None
    if requested is not None:
        if requested not in ALL_BACKENDS:
            source = ENV_VAR if from_env else "backend"
            raise ValueError(f"{op}: unknown {source}={requested!r}; choose one of {supported}")
        if requested not in supported:
            if not from_env:
                raise ValueError(
                    f"{op}: backend={requested!r} is not implemented; choose one of {supported}"
                )
            warn_once(
                f"{op}:env:{requested}",
                f"{op}: {ENV_VAR}={requested!r} is not implemented by this op; using its default",
            )
            requested = None
    if requested is None:
        if device.type == "cuda":
            requested = "cuda" if "cuda" in supported and cuda_kernels_built() else "triton"
        else:
            requested = "cpu"
        if requested not in supported:
            requested = "chunked"
    reason = _unavailable_reason(requested, device)
    if reason is not None and explicit:
        # a caller who named the backend gets it or an error: a benchmark or a test that asked
        # for the C++ kernel must not time or check the chunked one under a warning
        raise RuntimeError(f"{op}: backend={requested!r} is not available: {reason}")
    if reason is not None:
        warn_once(
            f"{op}:{requested}:{reason}",
            f"{op}: falling back to the chunked PyTorch backend because {reason}",
        )
        return "chunked"
    return requested
