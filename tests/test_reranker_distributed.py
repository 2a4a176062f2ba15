"""The reranker's held-out eval on two CPU ranks (torchrun, gloo) gives one process's metrics:
each rank reranks its share of the lists (one rank has none in the last group and runs the
dummy forwards ZeRO-3 needs), the orders and the decoding repairs are gathered, and nDCG@10,
nDCG@5, MRR@10, the first stage's and the eval loss come out as in one process.

10 held-out lists of 4-7 passages (the generator of test_reranker_train.py), windows of 5 and
stride 3; the launch helpers are test_train_distributed.py's.
"""

from __future__ import annotations

import json

import pytest
from test_reranker_train import _rows
from test_train_distributed import _finish, _launch

pytestmark = pytest.mark.slow


def _args(assets, data, out, *extra):
    return [
        "--loss", "rankllm", "--model", str(assets / "model"), "--data", str(data),
        "--max-steps", "1", "--lr", "5e-3", "--eval-fraction", "0.5", "--eval-every", "100",
        "--window", "5", "--stride", "3", "--no-progress", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def _evals(out) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval/loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("lists") / "lists.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(20)))
    return path


# ZeRO-3 with FIRST scores: the rank without lists runs dummy forwards; stage 0 with --decode:
# the repairs of both ranks are summed
@pytest.mark.parametrize("stage, extra", [(3, ()), (0, ("--decode",))], ids=["first", "decode"])
def test_two_ranks_evaluate_as_one_process(assets, data, tmp_path, stage, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    _finish(_launch(_args(assets, data, one, "--micro-batch", "1", "--grad-accum", "2", *extra)))
    argv = _args(assets, data, two, "--micro-batch", "1", "--zero-stage", str(stage), *extra)
    assert "world=2" in _finish(_launch(argv, nproc=2))
    evals_one, evals_two = _evals(one), _evals(two)
    assert [r["step"] for r in evals_one] == [r["step"] for r in evals_two] == [0, 1]
    for a, b in zip(evals_one, evals_two, strict=True):
        assert set(a) == set(b)
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-4)
        for key in a:
            if key.startswith(("eval/first_stage/", "eval/decode/")) or key in (
                "eval/accuracy", "eval/nDCG@5", "eval/MRR@10",
            ):  # fmt: skip
                assert b[key] == pytest.approx(a[key], abs=1e-9), key
    if extra:
        assert evals_two[0]["eval/decode/windows"] >= 10  # every held-out list's windows
