"""The op fuzz (``test_ops_fuzz.py``) against an AddressSanitizer build of the C++ kernels, so a
heap overflow or use-after-free in a kernel fails the run instead of reading garbage.

The build (``FASTPREF_ASAN=1 python setup.py build_ext``) goes to ``build/asan/``, never over the
``fastpref/_C*.so`` everyone else uses; ninja makes a rerun incremental. The fuzz runs in a
subprocess with ASan's runtime preloaded (Python and torch are not built with it) and the
ASan ``_C`` installed as ``fastpref._C`` before fastpref is imported. Leak checking is off: torch
and Python leak by design at exit.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "asan"
OPTIONS = "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86"
EXAMPLES = "200"  # per op; the plain run draws 40 (about 25 s under ASan on 2 cores)

# Runs in the ASan subprocess: load the ASan build as fastpref._C, prove it is the one in use,
# then run pytest on the arguments.
BOOT = """
import ctypes, importlib.util, sys
import torch  # libtorch before the extension, as fastpref/__init__ does
spec = importlib.util.spec_from_file_location("fastpref._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["fastpref._C"] = module
import fastpref.ops._native as native
assert native._C is module and native.native_available(), "the ASan build is not loaded"
ctypes.CDLL(None).__asan_report_load8  # ASan's runtime is in this process
print("asan extension:", module.__file__, flush=True)
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""
CANARY = """
import ctypes
malloc = ctypes.CDLL(None).malloc
malloc.restype = ctypes.c_void_p
ctypes.string_at(malloc(8), 16)  # reads 8 bytes past the block
"""


def _preload() -> str | None:
    """``libasan.so libstdc++.so`` of the compiler (libstdc++ too: python does not link it, and
    ASan's ``__cxa_throw`` interceptor needs it loaded when ASan starts); None without gcc."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        out = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True)
        path = out.stdout.strip()
        if not (os.path.isabs(path) and os.path.exists(path)):
            return None
        libs.append(path)
    return " ".join(libs)


def _build() -> Path:
    """Build (or bring up to date) the ASan extension under build/asan; returns the .so."""
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:  # two sessions building at once share one tree
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = {**os.environ, "FASTPREF_ASAN": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(BUILD / "lib"),
               "--build-temp", str(BUILD / "temp")]  # fmt: skip
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (so,) = (BUILD / "lib" / "fastpref").glob("_C*.so")
    return so


@pytest.mark.slow
def test_op_fuzz_under_address_sanitizer(tmp_path):
    preload = _preload()
    if preload is None:
        pytest.skip("no gcc with libasan.so on this machine to build the ASan extension with")
    started = time.perf_counter()
    so = _build()
    built = time.perf_counter()
    assert b"__asan_report_load" in so.read_bytes(), f"{so} is not instrumented"
    env = {**os.environ, "LD_PRELOAD": preload, "PYTHONPATH": str(ROOT),
           "ASAN_OPTIONS": f"{OPTIONS}:log_path={tmp_path / 'asan'}",
           "FASTPREF_OPS_FUZZ_EXAMPLES": EXAMPLES}  # fmt: skip
    # The harness itself: a heap overflow under these settings fails the process with a report.
    canary = subprocess.run([sys.executable, "-c", CANARY], env=env, capture_output=True, text=True)
    logs = lambda: "".join(p.read_text(errors="replace") for p in tmp_path.glob("asan.*"))  # noqa: E731
    overflow = canary.returncode == 86 and "heap-buffer-overflow" in logs()
    assert overflow, (canary.stderr + logs())[-2000:]
    for p in tmp_path.glob("asan.*"):
        p.unlink()
    fuzz = [sys.executable, "-c", BOOT, str(so), str(ROOT / "tests" / "test_ops_fuzz.py"),
            "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]  # fmt: skip
    out = subprocess.run(fuzz, cwd=ROOT, env=env, capture_output=True, text=True)
    ran = time.perf_counter()
    print(f"ASan build {built - started:.1f} s, fuzz under ASan {ran - built:.1f} s")
    report = out.stdout[-4000:] + out.stderr[-2000:] + logs()[:8000]
    assert not logs() and out.returncode == 0, report
    assert f"asan extension: {so}" in out.stdout and " passed" in out.stdout, report
