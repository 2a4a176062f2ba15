"""The Triton similarity_topk kernel (fastpref/kernels/similarity_topk.py) under
TRITON_INTERPRET=1 on CPU.

``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted, so the
cases run in ONE subprocess started with ``TRITON_INTERPRET=1`` (this file run as a script); the
tests here compare what it returns with the reference. A second subprocess, started at the same
time, compiles the kernel for a Hopper GPU (what the interpreter cannot show).

Shapes are tiny because the interpreter runs every tile op in numpy: B=37, D=31, M=203 with
16-wide tiles leaves every dimension ragged; the public op runs with its own tile sizes. Integer
inputs make every score exact, so results must equal the reference bit for bit (ties included).
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernel needs the `triton` package (test extra)")

from fastpref.ops.similarity_topk import similarity_topk_reference  # noqa: E402

SMALL = dict(block_b=16, block_m=16, block_d=16)
CASES = {  # name -> (dtype, k, exclude?, normalize?)
    "fp32-k1": (torch.float32, 1, False, False),
    "fp32-k5-exclude": (torch.float32, 5, True, False),
    "fp32-k203-exclude": (torch.float32, 203, True, False),
    "bf16-k5-exclude": (torch.bfloat16, 5, True, False),
    "fp32-k5-cosine": (torch.float32, 5, True, True),
}


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (37, 31), generator=g).to(dtype)
    c = torch.randint(-2, 3, (203, 31), generator=g).to(dtype)
    ex = torch.randint(0, 203, (37, 3), generator=g)
    ex[0] = -1
    ex[1, 1:] = -1
    return q, c, ex


def _worker(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run the worker with TRITON_INTERPRET=1"
    import fastpref
    from fastpref.kernels import similarity_topk as K
    from fastpref.kernels.similarity_topk import similarity_topk_keys
    from fastpref.ops._similarity_topk_chunked import pack_keys

    calls = []  # proof that the op reached the launcher rather than a fallback
    counted = lambda *a, _f=K.similarity_topk_keys, **kw: calls.append(1) or _f(*a, **kw)
    K.similarity_topk_keys = counted
    results: dict = {}
    for name, (dtype, k, with_ex, normalize) in CASES.items():
        q, c, ex = _inputs(dtype)
        try:
            got = fastpref.similarity_topk(
                q, c, k, exclude=ex if with_ex else None, normalize=normalize, backend="triton"
            )
            results[name] = (got.scores, got.indices, len(calls))
            calls.clear()
        except Exception:
            results[name] = traceback.format_exc()
    # the launcher alone, with small ragged tiles, against the chunked backend's key encoding
    q, c, _ = _inputs(torch.float32)
    c[7, 0] = float("nan")
    c[9] = -c[9] * 0.0  # scores -0 and 0 must give equal keys
    keys = similarity_topk_keys(q, c, 16, 203, **SMALL)
    results["keys"] = (keys, pack_keys(q @ c[16:].T, 16))
    torch.save(results, out_path)


def _compile_worker() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") == "0", "compile without TRITON_INTERPRET"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastpref.kernels import similarity_topk as K

    fn = K._similarity_topk_keys_kernel
    consts = dict(HAS_SCALE=True, BLOCK_B=64, BLOCK_M=64, BLOCK_D=32, PRECISION="tf32")
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg == "keys_ptr":
            sig[arg] = "*i64"
        elif arg == "inv_ptr":
            sig[arg] = "*fp32"
        elif arg.endswith("_ptr"):
            sig[arg] = "*bf16"
        else:
            sig[arg] = "i32"
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert compiled.asm["cubin"]
    print("compiled similarity_topk_keys")


@pytest.fixture(scope="module")
def _workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton_similarity_topk")
    out = tmp / "results.pt"
    interp_env = dict(os.environ, TRITON_INTERPRET="1")
    interp_env.pop("FASTPREF_BACKEND", None)
    compile_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    compile_env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # compile for real, not from a cache
    start = lambda args, env: subprocess.Popen(
        [sys.executable, __file__, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs = {
        "interpret": start([str(out)], interp_env),
        "compile": start(["--compile"], compile_env),
    }
    yield {"out": out, **procs}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def _finish(proc: subprocess.Popen, what: str) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} worker failed:\n{output}"
    return output


@pytest.fixture(scope="module")
def kernel(_workers) -> dict:
    _finish(_workers["interpret"], "interpreter")
    return torch.load(_workers["out"], weights_only=False)


@pytest.mark.parametrize("name", list(CASES))
def test_public_op_matches_the_reference(kernel, name):
    got = kernel[name]
    assert isinstance(got, tuple), f"similarity_topk(backend='triton') raised:\n{got}"
    assert got[2] >= 1, "the Triton launcher was not called"
    dtype, k, with_ex, normalize = CASES[name]
    q, c, ex = _inputs(dtype)
    want = similarity_topk_reference(q, c, k, exclude=ex if with_ex else None, normalize=normalize)
    if normalize:  # cosines are not exact: a valid top k of the same values
        torch.testing.assert_close(got[0], want.scores, rtol=0, atol=1e-6)
        return
    assert torch.equal(got[1], want.indices)
    assert torch.equal(got[0], want.scores)


def test_launcher_keys_equal_the_chunked_encoding(kernel):
    keys, want = kernel["keys"]
    assert keys.shape == (37, 187) and keys.dtype == torch.int64
    assert torch.equal(keys, want)


def test_kernel_compiles_for_a_gpu(_workers):
    assert "compiled similarity_topk_keys" in _finish(_workers["compile"], "GPU compile")


if __name__ == "__main__":
    _compile_worker() if sys.argv[1] == "--compile" else _worker(sys.argv[1])
