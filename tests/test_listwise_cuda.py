"""The CUDA source of fastpref.listwise_loss, compiled by nvcc for sm_80 and sm_90.

This torch is a CPU build, so setup.py does not compile csrc/cuda/; this test does. What is
compiled: csrc/cuda/listwise.cu with `nvcc -c -DFASTPREF_CUDA_STANDALONE`, i.e. both kernels
(pairwise: one thread per item; listnet/listmle: one thread per list) for float and double,
instantiated through the plain C launchers `fastpref_listwise_launch_f32/_f64`, against the
shared header csrc/include/fastpref/listwise_math.h and the CUDA runtime only. The ATen glue at
the end of the file (checks, allocation, stream, TORCH_LIBRARY_IMPL) is left out: the CPU wheel
ships torch's CUDA headers without their generated c10/cuda/impl/cuda_cmake_macros.h, and in a
CUDA build of torch setup.py compiles the whole file. The arithmetic those kernels run is
checked on the CPU by test_listwise.py's "itemwise" backend (the same header, the same per-item
schedule).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "listwise.cu"


def _nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


NVCC = _nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed, so the .cu cannot be compiled")
def test_nvcc_compiles_listwise_kernels_for_sm80_and_sm90(tmp_path):
    obj = tmp_path / "listwise.o"
    cmd = [
        NVCC, "-c", str(SOURCE), "-o", str(obj), "-std=c++17", "-O3",
        "-DFASTPREF_CUDA_STANDALONE", f"-I{ROOT / 'csrc' / 'include'}",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-Xptxas", "-v",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = proc.stdout + proc.stderr
    compiled = set(re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", log))
    for arch in ("sm_80", "sm_90"):
        for kernel in ("listwise_pairwise_kernel", "listwise_list_kernel"):
            for scalar in ("If", "Id"):  # float and double instantiations
                assert any(kernel + scalar in name and a == arch for name, a in compiled), (
                    f"{kernel}<{scalar}> was not compiled for {arch}:\n{log}"
                )
    assert "spill" not in log or re.search(r"[1-9]\d* bytes spill", log) is None, log
    data = obj.read_bytes()
    for symbol in (b"fastpref_listwise_launch_f32", b"fastpref_listwise_launch_f64"):
        assert symbol in data


def test_cuda_source_is_sync_free_and_shares_the_header():
    text = re.sub(r"//[^\n]*", "", SOURCE.read_text())  # code only, not the header comment
    for call in ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaMemcpy", ".item()"):
        assert call not in text, f"{call} would make the CUDA op wait on the host"
    assert '#include "fastpref/listwise_math.h"' in text
    assert "pairwise_item(" in text and "listmle_list(" in text and "listnet_list(" in text
