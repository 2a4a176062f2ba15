"""Worker for bench_train.py: run ``fastpref-train`` in this process and time its reference pass.

``python bench/_fastpref_worker.py RESULT.json -- <fastpref-train flags>`` is the console script
``fastpref-train <flags>`` (both call ``fastpref.cli.train.main``), plus two observers that
change nothing: a timer around the reference-log-prob precompute, so the benchmark can count it
in full, and a clock (wall and process CPU time) read each time the run log writes a record, so
a step's time is the interval between two step records, as TRL's is between two ``on_step_end``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _common import peak_rss_mb, require_native


def main() -> int:
    require_native()
    out, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: _fastpref_worker.py RESULT.json -- <fastpref-train flags>"
    result: dict[str, object] = {"precompute_s": [], "precompute_cpu_s": []}
    try:
        import fastpref.train.reference as reference

        original = reference.compute_reference_table

        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            table = original(*args, **kwargs)
            result["precompute_s"].append(time.perf_counter() - start)  # type: ignore[union-attr]
            result["precompute_cpu_s"].append(time.process_time() - cpu)  # type: ignore[union-attr]
            return table

        reference.compute_reference_table = timed
    except (ImportError, AttributeError) as e:
        result["precompute_s"] = None
        result["precompute_timer_error"] = repr(e)
    marks: list[dict] = []
    result["log_marks"] = marks
    try:
        from fastpref.train.runlog import RunLog

        write = RunLog.write

        def clocked_write(self, record: dict) -> None:
            marks.append(
                {
                    "wall": time.perf_counter(),
                    "cpu": time.process_time(),
                    "step": record.get("step"),
                    "train": "tokens/s" in record,
                }
            )
            write(self, record)

        RunLog.write = clocked_write
    except (ImportError, AttributeError) as e:
        result["log_marks_error"] = repr(e)

    from fastpref.cli.train import main as cli_main

    start = time.perf_counter()
    rc = cli_main(argv)
    result["train_call_s"] = time.perf_counter() - start
    result["rc"] = rc
    result["peak_rss_mb"] = peak_rss_mb()
    import torch

    result["torch_threads"] = torch.get_num_threads()
    Path(out).write_text(json.dumps(result, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
