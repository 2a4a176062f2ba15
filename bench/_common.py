"""Helpers shared by the benchmarks in bench/ (not part of the installed package).

The benchmark files import this module as ``_common``: pytest puts bench/ on ``sys.path`` when it
collects a test file from a directory without ``__init__.py``, and the worker scripts run as
``python bench/_<worker>.py`` get their own directory there too.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

# FASTPREF_BENCH_QUICK=1: tiny shapes and one timed step, to smoke-test the benchmark code itself.
QUICK = os.environ.get("FASTPREF_BENCH_QUICK", "0") not in ("", "0")

# The small Llama of the end-to-end benchmark (issue 7): hidden 256, 4 layers. The vocabulary is
# the swept variable; everything else is fixed here, in one place, for both trainers.
LLAMA = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA_QUICK = dict(LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2)

# glibc: serve every allocation above 128 KiB with mmap and return it on free, so that the
# resident set of a worker tracks its live tensors (the default dynamic threshold keeps freed
# buffers in the heap, which hides the peak of a later call).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# what every benchmark's child process runs under: nothing from a hub, no progress bars
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}


def hardware() -> dict[str, object]:
    """The machine a result was measured on."""
    import torch

    cpu, family = platform.processor() or "unknown", "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (platform.processor() or "unknown"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("cpu family") and family == "unknown":
                family = line.split(":", 1)[1].strip()  # AMD: 25 Zen 4, 26 Zen 5
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = float("nan")
    return {
        "cpu": cpu,
        "cpu_family": family,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem_gb, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@dataclass
class ChildRun:
    """A finished worker process: exit code, output and wall time."""

    cmd: list[str]
    rc: int
    stdout: str
    stderr: str
    wall_s: float

    def check(self) -> ChildRun:
        if self.rc != 0:
            raise RuntimeError(
                f"worker failed (exit {self.rc}): {' '.join(self.cmd)}\n"
                f"--- stdout (tail) ---\n{self.stdout[-3000:]}\n"
                f"--- stderr (tail) ---\n{self.stderr[-6000:]}"
            )
        return self


def run_child(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None
) -> ChildRun:
    """Run ``cmd`` and return its output and wall time.

    Peak memory is reported by the worker itself (:func:`peak_rss_mb`, read just before it exits):
    the parent's ``ru_maxrss`` of a child is useless here, because Linux starts a forked child's
    high-water mark at the parent's resident set (a pytest process holding gigabytes of inputs).
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return ChildRun(
            cmd=list(cmd),
            rc=proc.returncode,
            stdout=out.read(),
            stderr=err.read(),
            wall_s=wall,
        )


def python_worker(script: str, *args: str) -> list[str]:
    """Command line that runs ``bench/<script>`` with this interpreter."""
    return [sys.executable, str(BENCH_DIR / script), *args]


def require_native() -> None:
    """Stop a fastpref worker whose C++ kernels are not built.

    The trainer's default dispatch falls back to the chunked PyTorch ops with one warning when
    ``fastpref._C`` is missing; a benchmark of fastpref would then time the fallback and report
    it as the kernels (a fresh checkout without ``pip install -e .`` did exactly that once).
    """
    try:
        import fastpref._C  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"bench: fastpref._C is not built ({exc}); run `pip install --no-build-isolation -e .`"
        ) from exc


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set since it started (VmHWM), in MiB.

    VmHWM belongs to the address space created by ``exec``, so it counts only this worker,
    whatever the parent held when it forked.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def loadavg() -> float:
    """1-minute load average: other processes competing for the cores while we measure."""
    return os.getloadavg()[0]


def current_rss_bytes() -> int:
    """Resident set of this process right now (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Context manager: the largest resident set seen while the block runs, sampled every
    ``interval_s`` by a thread (torch kernels release the GIL, so it samples during them).

    ``peak_above_start`` is that peak minus the resident set when the block started.
    """

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeak:
        self.start = self.peak = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())

    @property
    def peak_above_start(self) -> int:
        return self.peak - self.start


def build_llama(
    out_dir: Path, vocab_size: int, tokenizer_dir: Path, *, quick: bool = False, seed: int = 0
) -> Path:
    """Save a randomly initialised Llama (fixed seed) and the tokenizer to ``out_dir``.

    Both trainers load this same directory, so they start from the same weights.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        **(LLAMA_QUICK if quick else LLAMA),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(obj: object) -> object:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)  # type: ignore[arg-type]
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")
