"""What a family is: the interface between the family-free loop (``fastpref.train``) and one
kind of training.

A **family** (one file under ``fastpref/families/``) owns everything the loop must not know: its
``--loss`` names (:class:`Objective`), its own options (:class:`Option`), its data formats, how a
row becomes tokens and a batch, the model adapter, the loss's input dataclass, the reference
values and the evaluation metrics. The loop asks the family for a :class:`Task` (one run of one
objective) and then only calls the task's methods, in this order::

    task = family.start(objective, cfg, hparams)       # checks options, loads nothing
    rows = task.read(source, columns)                  # validated rows (DataError: file:line:field)
    examples = task.prepare(rows, source, split)       # tokenised examples
    model = task.build_model(dist)                     # what DeepSpeed wraps, and how to save it
    task.reference(...)                                # via fastpref.train.reference, if needed
    batch = task.collate([examples[i] for i in idx])   # one micro-batch
    result = task.step(engine, batch, "train")         # StepResult
    result = task.evaluate(engine, examples, dist)     # EvalResult
    task.save(module, out_dir, state_dict)             # the final model, loadable by its tools

``cfg`` is the run's configuration object (``fastpref.train.TrainConfig``); a family reads the
core fields it needs (``model``, ``tokenizer``, ``max_length``, ``seed``, ...) and its own
options by name, and never imports the trainer.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "Dist",
    "EvalResult",
    "Family",
    "Model",
    "Objective",
    "Option",
    "StepResult",
    "Task",
    "batch_to_device",
    "rank_slices",
]


@dataclass(frozen=True)
class Option:
    """An option of a family (not a loss hyperparameter), declared once: the CLI flag
    ``--<name>`` and the config key derive from it. ``check(value)`` returns an error text
    (e.g. ``"must be > 0"``) or None."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None


@dataclass(frozen=True)
class Objective:
    """One ``--loss`` value: the loss function and what the family needs to know about it."""

    name: str  # the --loss value
    fn: Callable  # fn(inputs, **hparams) -> (scalar loss, LossMetrics)
    fmt: str  # the family's data format it trains on
    needs_reference: bool  # whether fn reads reference values
    lr: float  # default peak learning rate for a pretrained model
    columns: str = ""  # the data columns it reads, for --help ("prompt, chosen, rejected")

    def hparams(self) -> dict[str, object]:
        """Keyword-only hyperparameter names -> defaults, read from ``fn``'s signature."""
        return {
            p.name: p.default
            for p in inspect.signature(self.fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    @property
    def inputs(self) -> type:
        """The input dataclass ``fn`` takes (its first parameter's annotation)."""
        first = next(iter(inspect.signature(self.fn).parameters))
        return typing.get_type_hints(self.fn)[first]

    def __call__(self, inputs: object, **hparams: object) -> tuple:
        return self.fn(inputs, **hparams)


@dataclass(frozen=True)
class Dist:
    """Where this process runs."""

    device: torch.device
    rank: int = 0
    world_size: int = 1


@dataclass
class Model:
    """What a task's model adapter hands the loop."""

    module: nn.Module  # what DeepSpeed wraps: forward gives what the loss needs
    vocab: int | None = None  # rows of the input embedding (checked against the tokenizer)
    hf_model: nn.Module | None = None  # the Hugging Face model inside (its input embedding
    # may get row-sparse gradients, see fastpref.train.engine.sparse_embedding_gradients)


@dataclass
class StepResult:
    """One micro-batch's forward."""

    loss: Tensor  # scalar, differentiable
    metrics: dict[str, Tensor]  # detached 0-dim tensors under the names TRL users know
    tokens: Tensor  # 0-dim: trained tokens (for tokens/s)


@dataclass
class EvalResult:
    """A held-out evaluation: the loss, the family's headline metric, and the rest."""

    loss: float
    accuracy: float  # the headline metric (preference accuracy, AUC, nDCG@10, ...)
    metrics: dict[str, float] = field(default_factory=dict)  # "eval/<name>" without the prefix

    def record(self) -> dict[str, float]:
        """``{"eval/loss", "eval/accuracy", "eval/<metric>"...}`` for the metrics log."""
        return {
            **{f"eval/{k}": v for k, v in self.metrics.items()},
            "eval/loss": self.loss,
            "eval/accuracy": self.accuracy,
        }


class Task(Protocol):
    """One run of one objective (see the module docstring for the order of the calls)."""

    objective: Objective
    tokenizer: Any  # the run's tokenizer (its length is checked against the model's vocab)
    metric_name: str  # what EvalResult.accuracy is, for the console ("preference accuracy")
    default_data: Path  # the bundled data of the objective's format
    default_lr: float  # when --lr is unset
    embedded_steps: int  # steps of the embedded default (no --model, no --data)

    def read(self, source: str, columns: dict[str, str] | None) -> list[dict]: ...
    def prepare(self, rows: Sequence[dict], source: str, split: str) -> list[dict]: ...
    def build_model(self, dist: Dist) -> Model: ...
    def reference_scorer(self, dist: Dist) -> tuple[nn.Module, str] | None: ...
    def reference_values(self, scorer: nn.Module, batch: dict) -> Tensor: ...
    def use_reference(self, split: str, table: Tensor | None, scorer: nn.Module | None) -> None: ...
    def collate(self, examples: Sequence[dict]) -> dict: ...
    def step(self, model: nn.Module, batch: dict, split: str) -> StepResult: ...
    def evaluate(self, model: nn.Module, examples: list[dict], dist: Dist) -> EvalResult: ...
    def save(self, module: nn.Module, out_dir: Path, state_dict: dict | None) -> None: ...


class Family(Protocol):
    """One kind of training: its objectives and options, and a :class:`Task` per run."""

    name: str
    summary: str  # one line for --help
    objectives: tuple[Objective, ...]
    options: tuple[Option, ...]

    def start(self, objective: Objective, cfg: Any, hparams: dict[str, object]) -> Task: ...


def batch_to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def rank_slices(n: int, batch_size: int, dist: Dist):
    """This rank's share of ``range(n)`` in global batches of ``batch_size × world_size``.

    Yields ``(indices, weight)``; a rank with no example left in the last global batch gets
    ``([start], 0.0)`` so that every rank still runs the forward (ZeRO-3 gathers collectively).
    """
    step = batch_size * dist.world_size
    for start in range(0, n, step):
        idx = list(range(start, min(start + step, n)))
        idx = idx[dist.rank * batch_size : (dist.rank + 1) * batch_size]
        yield (idx, 1.0) if idx else ([start], 0.0)


def gather_objects(obj: object, dist: Dist) -> list:
    """Every rank's ``obj`` (one all-gather); ``[obj]`` in a single process."""
    if dist.world_size == 1:
        return [obj]
    out: list = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


class WeightedMeans:
    """Example-weighted means of named finite values (what an eval reports besides accuracy)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, values: dict[str, object], n: float) -> None:
        for key, value in values.items():
            v = float(value)
            if math.isfinite(v):
                self.sums[key] = self.sums.get(key, 0.0) + v * n
                self.counts[key] = self.counts.get(key, 0.0) + n

    def merged(self, dist: Dist) -> dict[str, float]:
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for s, c in gather_objects((self.sums, self.counts), dist):
            for k in s:
                sums[k] = sums.get(k, 0.0) + s[k]
                counts[k] = counts.get(k, 0.0) + c[k]
        return {k: sums[k] / counts[k] for k in sums if counts[k]}
