"""The Triton listwise kernels (fastpref/kernels/listwise.py), checked on CPU tensors,
TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before triton is first imported, and setting it in this process
would change triton for every other test module, so the cases in _listwise_triton_cases.py run
in a subprocess (its own pytest) with the variable set; this test fails if any of them fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton", reason="the triton package is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FASTPREF_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(HERE / "_listwise_triton_cases.py")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in out and "failed" not in out, out[-2000:]
