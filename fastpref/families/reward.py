"""The reward-model family: ``--loss rm``, a scalar head trained Bradley–Terry on preference pairs.

Data: the LM family's ``pair`` format (prompt, chosen, rejected, optional margin), tokenised and
collated the same way (``fastpref.families.lm_formats``). Model adapter:
``AutoModelForSequenceClassification(num_labels=1)`` through ``fastpref.models.RewardScorer`` —
the head's value at the last real token. Held-out accuracy: head(prompt + chosen) >
head(prompt + rejected), ties ½. The saved model is a plain sequence-classification checkpoint
(what ``fastpref-aepo --reward-model`` and TRL's reward tooling read).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastpref.families import lm_formats
from fastpref.families.base import Dist, EvalResult, Model, Objective, StepResult
from fastpref.families.lm_preference import LMData, evaluate_preferences
from fastpref.losses import RewardScores, rm
from fastpref.losses.metrics import pairwise_correct
from fastpref.models import RewardScorer, build_or_load_reward_model

__all__ = ["FAMILY", "RewardModel"]

BUILT_MODEL_LR = 2e-3  # the bundled tiny Llama's head and body train from scratch
EMBEDDED_STEPS = 60
FORMAT = "pair"


class RewardModel:
    name = "reward-model"
    summary = "sequence-classification head, Bradley–Terry on pairs"
    objectives = (Objective("rm", rm, FORMAT, False, 1e-5, lm_formats.COLUMNS[FORMAT]),)
    options = ()

    def start(self, objective: Objective, cfg: Any, hparams: dict[str, object]) -> RewardTask:
        return RewardTask(objective, cfg, hparams)


FAMILY = RewardModel()


class RewardTask:
    def __init__(self, objective: Objective, cfg: Any, hparams: dict[str, object]) -> None:
        self.data = LMData(cfg, FORMAT)
        self.objective, self.cfg, self.hparams = objective, cfg, hparams
        self.metric_name = "preference accuracy"
        self.default_data = self.data.default_data
        self.default_lr = BUILT_MODEL_LR if cfg.model is None else objective.lr
        self.embedded_steps = EMBEDDED_STEPS

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def read(self, source: str, columns: dict[str, str] | None) -> list[dict]:
        return self.data.read(source, columns)

    def prepare(self, rows: Sequence[dict], source: str, split: str) -> list[dict]:
        return self.data.tokenize(rows, source)

    def collate(self, examples: Sequence[dict]) -> dict:
        return self.data.collate(examples)

    def build_model(self, dist: Dist) -> Model:
        cfg = self.cfg
        model = build_or_load_reward_model(
            cfg.model,
            vocab_size=len(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id,
            seed=cfg.seed,
            attn=cfg.attn_implementation,
            dtype=torch.bfloat16 if cfg.bf16 else None,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle=cfg.allow_pickle,
        )
        vocab = model.get_input_embeddings().num_embeddings
        return Model(module=RewardScorer(model), vocab=vocab, hf_model=model)

    def reference_scorer(self, dist: Dist) -> None:
        return None  # a reward model has no reference

    def reference_values(self, scorer: nn.Module, batch: dict) -> Tensor:
        raise NotImplementedError("rm has no reference")

    def use_reference(self, split: str, table: Tensor | None, scorer: nn.Module | None) -> None:
        raise NotImplementedError("rm has no reference")

    def forward(self, model: nn.Module, batch: dict, split: str):
        B = batch["batch_size"]
        values, tokens = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        values, tokens = values.view(2, B), tokens.view(2, B)
        inputs = RewardScores(chosen=values[0], rejected=values[1], margin=batch.get("margin"))
        loss, metrics = self.objective.fn(inputs, **self.hparams)
        return loss, metrics.as_dict(), values, tokens, None

    def step(self, model: nn.Module, batch: dict, split: str) -> StepResult:
        loss, metrics, _, tokens, _ = self.forward(model, batch, split)
        return StepResult(loss=loss, metrics=metrics, tokens=tokens.sum())

    def accuracy_parts(self, batch: dict, values: Tensor, tokens: Tensor, ref: None):
        correct = pairwise_correct(values[0] - values[1])
        return float(correct.sum()), float(correct.numel()), []

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[dict], dist: Dist) -> EvalResult:
        return evaluate_preferences(self, model, examples, dist)

    def save(self, module: nn.Module, out_dir: Path, state_dict: dict | None) -> None:
        module.model.save_pretrained(out_dir, state_dict=state_dict)
        self.tokenizer.save_pretrained(out_dir)
