"""A family is a plug-in: a toy family defined in this file (a format, an objective, an accuracy)
trains end to end through ``fastpref.train`` without any change to ``fastpref/train``, and the
registry's contract (every --loss in exactly one family; the loop imports no family).
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import fastpref.families as families
from fastpref.data import load_records
from fastpref.families.base import Dist, EvalResult, Model, Objective, StepResult
from fastpref.losses.metrics import LossMetrics, pairwise_correct
from fastpref.train import parse_config, train

pytestmark = pytest.mark.usefixtures("own_process_group")


# --------------------------------------------------------------------------- the toy family
# Rows {"x": [x1, x2], "label": true|false}; a linear scorer; a logistic loss; accuracy = the
# fraction of rows whose score has the label's sign (ties ½).


@dataclass
class ToyScores:
    scores: Tensor  # [B]
    labels: Tensor  # [B] bool


def toy_logistic(inputs: ToyScores, *, beta: float = 1.0) -> tuple[Tensor, LossMetrics]:
    """``mean softplus(−β·(2y − 1)·s)``: −log σ of the signed score (β = 1: plain logistic)."""
    sign = inputs.labels.float() * 2 - 1
    loss = torch.nn.functional.softplus(-beta * sign * inputs.scores).mean()
    return loss, LossMetrics(rewards_accuracies=(sign * inputs.scores > 0).float().mean())


class ToyTask:
    def __init__(self, objective, cfg, hparams):
        self.objective, self.cfg, self.hparams = objective, cfg, hparams
        self.tokenizer = None
        self.metric_name = "toy accuracy"
        self.default_data = Path("unused")
        self.default_lr = 0.1
        self.embedded_steps = 5

    def read(self, source, columns):
        def validate(row):
            x = row.get("x")
            if not (isinstance(x, list) and len(x) == 2):
                raise row.fail("x", "must be a list of 2 numbers")
            return {"x": [float(v) for v in x], "label": row.boolean("label")}

        return load_records(source, validate, columns=columns)

    def prepare(self, rows, source, split):
        return [{"example_id": i, **r} for i, r in enumerate(rows)]

    def build_model(self, dist: Dist) -> Model:
        torch.manual_seed(self.cfg.seed)
        return Model(module=nn.Linear(2, 1))

    def reference_scorer(self, dist):
        return None

    def reference_values(self, scorer, batch):
        raise AssertionError("no reference")

    def use_reference(self, split, table, scorer):
        raise AssertionError("no reference")

    def collate(self, examples):
        return {
            "x": torch.tensor([e["x"] for e in examples]),
            "label": torch.tensor([e["label"] for e in examples]),
        }

    def _loss(self, model, batch):
        scores = model(batch["x"])[:, 0]
        loss, metrics = self.objective.fn(ToyScores(scores, batch["label"]), **self.hparams)
        return loss, metrics, scores

    def step(self, model, batch, split) -> StepResult:
        loss, metrics, _ = self._loss(model, batch)
        return StepResult(loss, metrics.as_dict(), torch.tensor(float(len(batch["x"]))))

    @torch.no_grad()
    def evaluate(self, model, examples, dist) -> EvalResult:
        batch = self.collate(examples)
        loss, _, scores = self._loss(model, batch)
        sign = batch["label"].float() * 2 - 1
        return EvalResult(float(loss), float(pairwise_correct(sign * scores).mean()))

    def save(self, module, out_dir, state_dict):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), out_dir / "toy.pt")


class ToyFamily:
    name = "toy"
    summary = "a linear scorer on two numbers"
    objectives = (Objective("toy-logistic", toy_logistic, "toy", False, 0.1),)
    options = ()

    def start(self, objective, cfg, hparams):
        return ToyTask(objective, cfg, hparams)


@pytest.fixture
def toy_family():
    family = families.register(ToyFamily())
    yield family
    families.unregister(family)


def test_a_toy_family_trains_end_to_end_without_touching_the_loop(tmp_path, toy_family):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    rows = [{"x": v.tolist(), "label": bool(v[0] - 0.5 * v[1] > 0)} for v in x]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--loss", "toy-logistic", "--data", str(data), "--max-steps", "30", "--beta", "2"]
    out = tmp_path / "run"
    summary = train(parse_config(argv + ["--no-progress", "--output-dir", str(out)]))
    assert summary["accuracy_after"] > summary["accuracy_before"]
    assert summary["accuracy_after"] >= 0.8
    assert (out / "model" / "toy.pt").exists() and (out / "curves.png").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 30 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_toy_family_bad_row_names_file_line_field(tmp_path, toy_family, capsys):
    from fastpref.cli.train import main

    data = tmp_path / "toy.jsonl"
    data.write_text('{"x": [1, 2], "label": true}\n{"x": [1], "label": false}\n')
    assert main(["--loss", "toy-logistic", "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "toy.jsonl: line 2: field 'x' must be a list of 2 numbers" in err, err


def test_every_loss_belongs_to_exactly_one_family():
    names = [o.name for f in families.FAMILIES for o in f.objectives]
    assert sorted(names) == sorted(families.OBJECTIVES) and len(names) == len(set(names))
    for name in names:
        assert families.get_objective(name) in families.family_of(name).objectives
    with pytest.raises(ValueError, match="already registered"):
        families.register(families.family_of("dpo"))


def test_the_loop_imports_no_family_and_no_loss():
    """fastpref/train/ reaches families only through the registry and the base interface."""
    train_dir = Path(families.__file__).resolve().parent.parent / "train"
    allowed = {"fastpref.families", "fastpref.families.base"}
    for path in train_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
                if mod.startswith("fastpref.families"):
                    assert mod in allowed, f"{path.name} imports {mod}"
                assert not mod.startswith(("fastpref.losses.", "fastpref.models")), (
                    f"{path.name} imports {mod}"
                )


def test_lipo_trains_through_the_fused_listwise_kernel(assets, tmp_path, monkeypatch):
    """--loss lipo reaches fastpref.ops.listwise_loss and, on the CPU, the C++ kernel."""
    import fastpref.losses.listwise as lw

    kinds, kernel_calls = [], []
    public = lw.listwise_loss
    native = torch.ops.fastpref_C.listwise_fwd

    def spy_public(*args, **kwargs):
        kinds.append(kwargs["kind"])
        return public(*args, **kwargs)

    def spy_native(*args):
        kernel_calls.append(args[0].shape)
        return native(*args)

    monkeypatch.setattr(lw, "listwise_loss", spy_public)
    monkeypatch.setattr(torch.ops.fastpref_C, "listwise_fwd", spy_native)
    argv = ["--loss", "lipo", "--model", str(assets / "model"), "--data"]
    argv += [str(assets / "list.jsonl"), "--max-steps", "1", "--micro-batch", "2"]
    argv += ["--max-length", "48", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    train(parse_config(argv + ["--output-dir", str(tmp_path / "lipo")]))
    assert kinds and set(kinds) == {"lipo"}
    assert kernel_calls, "the C++ listwise kernel never ran"
