"""Triton linear log-probs kernels (fastpref/kernels/linear_logprobs.py) under TRITON_INTERPRET=1
on CPU.

``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted, so the
kernels are run in ONE subprocess started with ``TRITON_INTERPRET=1`` (this file run as a script,
see ``_worker``); the tests in this process only compare what it returns. That keeps the setting
out of every other test module in the same pytest process and pays the interpreter start once.
A second subprocess, started at the same time, compiles every kernel for a Hopper GPU (below).

Method (STYLE.md, three-way): ground truth is the plain-PyTorch reference below in fp32; ``ref`` is
the same reference in the test dtype; the kernel's error against the truth must be at most ref's
error plus ``TOL[dtype]``, for logp, lse and every gradient.

Shapes are tiny because the interpreter runs each tile op in numpy (0.1-1 s per launch here):
N=5, D=19, V=37 with 16-wide tiles makes every dimension ragged (V spans three tiles, the last
holding 5 columns; D spans two); N=17 spans two row blocks; N=1 is the single-row edge; one case
uses transposed (non-contiguous) inputs and the launcher's own block choice; one has logits with
standard deviation ~20, where almost every probability underflows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the `triton` package (test extra)")

SMALL = dict(block_n=16, block_v=16, block_d=16)  # tl.dot's minimum tile; fast in the interpreter
# The two backward schemes (fastpref/kernels/linear_logprobs.py docstring). chunk_bytes=1 makes
# the chunked one take one BLOCK_V-wide vocabulary chunk at a time: several chunks, fp32 sum of dH.
MODES = {"fused": dict(mode="fused"), "chunked": dict(mode="chunked", chunk_bytes=1)}

# Slack on top of the reference-in-dtype error, relative to max(1, largest true value): fp32 is
# summation-order noise; 16-bit covers one rounding of the stored gradients (bf16 2^-8, fp16 2^-11)
# with margin.
TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    N: int
    D: int
    V: int
    bias: bool
    temperature: float = 1.0
    softcap: float | None = None
    scale: float = 1.0  # weight scale: 1 gives logits std ~1, 20 gives std ~20
    transposed: bool = False  # non-contiguous hidden and weight
    blocks: bool = True  # pass SMALL; False lets the launcher pick from the shape


CASES = [
    Case("fp32-bias-softcap-temp", torch.float32, 5, 19, 37, True, 0.7, 3.0),
    Case("fp32-plain", torch.float32, 5, 19, 37, False),
    Case("fp32-one-row", torch.float32, 1, 19, 37, True, 2.0),
    Case("fp32-wide-logits", torch.float32, 5, 19, 37, True, scale=20.0),
    Case(
        "fp32-strided-default-blocks",
        torch.float32,
        6,
        20,
        40,
        True,
        softcap=5.0,
        transposed=True,
        blocks=False,
    ),  # fmt: skip
    Case("bf16-bias-softcap-temp", torch.bfloat16, 5, 19, 37, True, 0.7, 3.0),
    Case("bf16-two-row-blocks", torch.bfloat16, 17, 19, 37, False),
    Case("fp16-bias-softcap", torch.float16, 5, 19, 37, True, 1.0, 3.0),
]


def _inputs(case: Case, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(case.N, case.D, generator=g)
    w = torch.randn(case.V, case.D, generator=g) * (case.scale / case.D**0.5)
    b = torch.randn(case.V, generator=g) if case.bias else None
    y = torch.randint(0, case.V, (case.N,), generator=g)
    grad = torch.randn(case.N, generator=g)  # any upstream gradient, not just ones
    cast = lambda t: None if t is None else t.to(case.dtype)
    return dict(hidden=cast(h), weight=cast(w), bias=cast(b), targets=y, grad_logp=grad)


def _reference(hidden, weight, targets, bias, temperature, softcap):
    """Materialised logits, computed in the inputs' dtype; returns fp32 (logp, lse)."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lse = z.logsumexp(-1)
    return (z.gather(-1, targets[:, None])[:, 0] - lse).float(), lse.float()


def _reference_with_grads(inp: dict, case: Case, dtype: torch.dtype) -> dict:
    # copy=True: a fresh leaf even when dtype is already the input's (truth and ref both run)
    leaves = {
        k: None if inp[k] is None else inp[k].to(dtype, copy=True).requires_grad_()
        for k in ("hidden", "weight", "bias")
    }
    logp, lse = _reference(
        leaves["hidden"],
        leaves["weight"],
        inp["targets"],
        leaves["bias"],
        case.temperature,
        case.softcap,
    )
    (logp * inp["grad_logp"]).sum().backward()
    out = {"logp": logp.detach(), "lse": lse.detach()}
    for k, leaf in leaves.items():
        out[f"d_{k}"] = None if leaf is None else leaf.grad.float()
    return out


# ----------------------------------------------------------------------------------------------
# the worker: runs in a subprocess with TRITON_INTERPRET=1


def _worker(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run the worker with TRITON_INTERPRET=1"
    from fastpref.kernels.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

    results: dict = {}

    def run(inp: dict, case: Case, mode: str, needs=(True, True, True)):
        h, w = inp["hidden"], inp["weight"]
        if case.transposed:  # same values, transposed storage
            h, w = h.T.contiguous().T, w.T.contiguous().T
            assert not h.is_contiguous() and not w.is_contiguous()
        args = (h, w, inp["targets"], inp["bias"])
        opts = (case.temperature, case.softcap)
        blocks = SMALL if case.blocks else {}
        logp, lse = linear_logprobs_fwd(*args, *opts, **blocks)
        bwd_opts = dict(blocks, block_do=16) if blocks else {}
        bwd_opts.update(MODES[mode])
        grads = linear_logprobs_bwd(
            inp["grad_logp"],
            *args,
            lse,
            *opts,
            needs[0],
            needs[1],
            needs[2] and inp["bias"] is not None,
            **bwd_opts,
        )
        return dict(logp=logp, lse=lse, d_hidden=grads[0], d_weight=grads[1], d_bias=grads[2])

    for case in CASES:
        inp = _inputs(case)
        for mode in MODES:
            results[case.name, mode] = run(inp, case, mode)

    # Only the gradients asked for, and a second identical run is bitwise equal (no atomics).
    case = CASES[0]
    inp = _inputs(case)
    for mode in MODES:
        results["bias-only", mode] = run(inp, case, mode, needs=(False, False, True))
        results["hidden-only", mode] = run(inp, case, mode, needs=(True, False, False))
        results["rerun", mode] = run(inp, case, mode)

    # NaN in one row of hidden: that row's logp and lse are NaN, the others are untouched.
    nan_inp = dict(inp, hidden=inp["hidden"].clone())
    nan_inp["hidden"][2, 3] = float("nan")
    logp, lse = linear_logprobs_fwd(
        nan_inp["hidden"],
        inp["weight"],
        inp["targets"],
        inp["bias"],
        case.temperature,
        case.softcap,
        **SMALL,
    )
    results["nan-row"] = dict(logp=logp, lse=lse)

    # N = 0: empty outputs, zero gradients, no launch.
    e = dict(
        hidden=inp["hidden"][:0],
        weight=inp["weight"],
        targets=inp["targets"][:0],
        bias=inp["bias"],
        grad_logp=inp["grad_logp"][:0],
    )
    results["empty"] = run(e, case, "fused")
    results["empty-chunked"] = run(e, case, "chunked")

    # Bad input: every check raises ValueError naming the argument (message recorded).
    h, w, y, b = inp["hidden"], inp["weight"], inp["targets"], inp["bias"]
    bad_targets = y.clone()
    bad_targets[2] = case.V
    negative = y.clone()
    negative[3] = -1
    bad_calls = {
        "target-too-large": (h, w, bad_targets, b),
        "target-negative": (h, w, negative, b),
        "d-mismatch": (h[:, :-1], w, y, b),
        "dtype-mismatch": (h, w.double(), y, b),
        "targets-length": (h, w, y[:-1], b),
        "bias-length": (h, w, y, b[:-1]),
        "float-targets": (h, w, y.float(), b),
    }
    errors = {}
    for name, args in bad_calls.items():
        try:
            linear_logprobs_fwd(*args, case.temperature, case.softcap, **SMALL)
            errors[name] = "no error"
        except ValueError as err:
            errors[name] = str(err)
    try:
        linear_logprobs_bwd(
            inp["grad_logp"][:-1],
            h,
            w,
            y,
            b,
            results[case.name, "fused"]["lse"],
            case.temperature,
            case.softcap,
            True,
            True,
            True,
        )
        errors["grad-length"] = "no error"
    except ValueError as err:
        errors["grad-length"] = str(err)
    results["errors"] = errors

    # End to end through the public op: ignored rows, autograd, default tile sizes.
    try:
        results["public-op"] = _public_op_run()
    except Exception:  # reported by its own test, so the kernel tests above still run
        results["public-op"] = traceback.format_exc()

    torch.save(results, out_path)


PUBLIC = Case("public-op", torch.float32, 7, 19, 37, True, 0.7, 3.0)
IGNORED = [1, 4]  # rows whose target is ignore_index


def _public_inputs() -> dict:
    inp = _inputs(PUBLIC, seed=1)
    inp["targets"][IGNORED] = -100
    return inp


def _public_op_run() -> dict:
    import fastpref
    from fastpref.kernels import linear_logprobs as K

    calls = []  # proof that the op reached these launchers rather than a fallback
    for name in ("linear_logprobs_fwd", "linear_logprobs_bwd"):
        launcher = getattr(K, name)
        counted = lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k)
        setattr(K, name, counted)
    inp = _public_inputs()
    leaves = {k: inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    logp = fastpref.linear_logprobs(
        leaves["hidden"],
        leaves["weight"],
        inp["targets"],
        leaves["bias"],
        temperature=PUBLIC.temperature,
        softcap=PUBLIC.softcap,
        backend="triton",
    )
    (logp * inp["grad_logp"]).sum().backward()
    out = {"logp": logp.detach(), "calls": calls}
    out.update({f"d_{k}": leaf.grad for k, leaf in leaves.items()})
    return out


# What the interpreter cannot show: that the kernels compile for a real GPU. Triton's NVIDIA backend
# (bundled ptxas) compiles to a Hopper cubin without a GPU present, so a type or layout error
# that the interpreter tolerates still fails here. Production tile sizes, bf16 (the training dtype).
GPU_BUILDS = [
    ("fwd", "bf16", dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_N=64, BLOCK_V=128, BLOCK_D=64)),
    (
        "bwd_dlogits",
        "bf16",
        dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_N=64, BLOCK_V=128, BLOCK_D=64),
    ),
    (
        "bwd_dh",
        "bf16",
        dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, BLOCK_DO=128),
    ),
    (
        "bwd_dw",
        "bf16",
        dict(
            HAS_BIAS=True,
            HAS_SOFTCAP=True,
            BLOCK_N=64,
            BLOCK_V=64,
            BLOCK_D=32,
            BLOCK_DO=128,
            NEED_WEIGHT=True,
            NEED_BIAS=True,
        ),
    ),
]


def _compile_worker() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") == "0", "compile without TRITON_INTERPRET"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastpref.kernels import linear_logprobs as K

    for name, dtype, consts in GPU_BUILDS:
        fn = getattr(K, f"_linear_logprobs_{name}_kernel")
        consts = dict(consts, PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
        sig = {}
        for arg in fn.arg_names:
            if arg in consts:
                sig[arg] = "constexpr"
            elif arg in ("tgt_ptr",):
                sig[arg] = "*i64"
            elif arg in ("g_ptr", "lse_ptr", "logp_ptr"):
                sig[arg] = "*fp32"
            elif arg.endswith("_ptr"):
                sig[arg] = f"*{dtype}"
            else:
                sig[arg] = "fp32" if arg in ("inv_temp", "softcap") else "i32"
        src = ASTSource(
            fn=fn,
            signature=sig,
            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        )
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
        assert compiled.asm["cubin"], name
        print(f"compiled {name} {dtype}")


@pytest.fixture(scope="module")
def _workers(tmp_path_factory) -> dict:
    """Start both subprocesses at once (the interpreter run and the GPU compile)."""
    tmp = tmp_path_factory.mktemp("triton_linear_logprobs")
    out = tmp / "results.pt"
    interp_env = dict(os.environ, TRITON_INTERPRET="1")
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


# ----------------------------------------------------------------------------------------------
# tests (this process: comparisons only)


ALL_KEYS = ("logp", "lse", "d_hidden", "d_weight", "d_bias")


def _assert_three_way(got: dict, case: Case, keys=ALL_KEYS):
    inp = _inputs(case)
    truth = _reference_with_grads(inp, case, torch.float32)
    ref = _reference_with_grads(inp, case, case.dtype)
    for key in keys:
        if truth[key] is None:
            assert got[key] is None, f"{case.name}: {key} should be None without a bias"
            continue
        assert got[key] is not None, f"{case.name}: {key} missing"
        if key.startswith("d_"):
            param = inp[key[2:]]
            assert got[key].dtype == param.dtype, f"{key} dtype {got[key].dtype} != {param.dtype}"
            assert got[key].shape == param.shape
        else:
            assert got[key].dtype == torch.float32
        # Errors relative to the largest true value (absolute below 1): the wide-logits case has
        # gradients ~20x larger than the others.
        scale = max(1.0, truth[key].abs().max().item())
        err = (got[key].float() - truth[key]).abs().max().item() / scale
        ref_err = (ref[key] - truth[key]).abs().max().item() / scale
        assert err <= ref_err + TOL[case.dtype], (
            f"{case.name}: {key} error {err:.3g} > reference-in-{case.dtype} error {ref_err:.3g} "
            f"+ {TOL[case.dtype]:g}"
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_reference(kernel, case, mode):
    _assert_three_way(kernel[case.name, mode], case)


@pytest.mark.parametrize("mode", MODES)
def test_only_requested_gradients(kernel, mode):
    bias_only, hidden_only = kernel["bias-only", mode], kernel["hidden-only", mode]
    assert bias_only["d_hidden"] is None and bias_only["d_weight"] is None
    assert hidden_only["d_weight"] is None and hidden_only["d_bias"] is None
    _assert_three_way(bias_only, CASES[0], keys=("d_bias",))
    _assert_three_way(hidden_only, CASES[0], keys=("d_hidden",))


@pytest.mark.parametrize("mode", MODES)
def test_backward_is_deterministic(kernel, mode):
    first, again = kernel[CASES[0].name, mode], kernel["rerun", mode]
    for key in ("logp", "lse", "d_hidden", "d_weight", "d_bias"):
        assert torch.equal(first[key], again[key]), key


def test_nan_stays_in_its_row(kernel):
    logp, lse = kernel["nan-row"]["logp"], kernel["nan-row"]["lse"]
    assert logp[2].isnan() and lse[2].isnan()
    others = [0, 1, 3, 4]
    clean = kernel[CASES[0].name, "fused"]
    torch.testing.assert_close(logp[others], clean["logp"][others], rtol=0, atol=0)
    torch.testing.assert_close(lse[others], clean["lse"][others], rtol=0, atol=0)


@pytest.mark.parametrize("key", ["empty", "empty-chunked"])
def test_empty_rows(kernel, key):
    out = kernel[key]
    case = CASES[0]
    assert out["logp"].shape == (0,) and out["lse"].shape == (0,)
    assert out["d_hidden"].shape == (0, case.D)
    assert torch.count_nonzero(out["d_weight"]) == 0 and out["d_weight"].shape == (case.V, case.D)
    assert torch.count_nonzero(out["d_bias"]) == 0 and out["d_bias"].shape == (case.V,)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("target-too-large", "targets[2] = 37 is outside [0, V) with V = 37"),
        ("target-negative", "targets[3] = -1 is outside [0, V)"),
        ("d-mismatch", "hidden (5, 18), weight (37, 19)"),
        ("dtype-mismatch", "hidden torch.float32, weight torch.float64"),
        ("targets-length", "targets must be [N] = [5]"),
        ("bias-length", "bias must be [V] = [37]"),
        ("float-targets", "targets must be int64"),
        ("grad-length", "grad_logp must be [N] = [5], got (4,)"),
    ],
)
def test_bad_input_raises_value_error_naming_it(kernel, name, expected):
    assert expected in kernel["errors"][name]


def test_public_op_with_triton_backend(kernel):
    """fastpref.linear_logprobs(backend="triton"): rows with ignore_index give 0 and no gradient."""
    got = kernel["public-op"]
    assert isinstance(got, dict), f"fastpref.linear_logprobs(backend='triton') raised:\n{got}"
    assert got["calls"] == ["linear_logprobs_fwd", "linear_logprobs_bwd"]
    inp = _public_inputs()
    kept = torch.tensor([i not in IGNORED for i in range(PUBLIC.N)])
    compact = dict(inp, hidden=inp["hidden"][kept], targets=inp["targets"][kept])
    compact["grad_logp"] = inp["grad_logp"][kept]
    truth = _reference_with_grads(compact, PUBLIC, torch.float32)
    assert torch.equal(got["logp"][~kept], torch.zeros(len(IGNORED)))
    assert torch.equal(got["d_hidden"][~kept], torch.zeros(len(IGNORED), PUBLIC.D))
    tol = dict(rtol=0, atol=TOL[torch.float32])
    torch.testing.assert_close(got["logp"][kept], truth["logp"], **tol)
    torch.testing.assert_close(got["d_hidden"][kept], truth["d_hidden"], **tol)
    torch.testing.assert_close(got["d_weight"], truth["d_weight"], **tol)
    torch.testing.assert_close(got["d_bias"], truth["d_bias"], **tol)


def test_kernels_compile_for_a_gpu(_workers):
    output = _finish(_workers["compile"], "GPU compile")
    for name, dtype, _ in GPU_BUILDS:
        assert f"compiled {name} {dtype}" in output


if __name__ == "__main__":
    _compile_worker() if sys.argv[1] == "--compile" else _worker(sys.argv[1])
