"""The LM-preference family: a causal LM trained through the fused log-prob op.

Objectives: sft, the DPO family (dpo, cdpo, robust, ipo, hinge), the reference-free pair losses
(simpo, cpo, orpo), kto, the rationale losses (rdpo, rorpo) and lipo, on the formats of
``fastpref.families.lm_formats``. The model adapter is ``fastpref.models.PolicyLogps``: backbone
hidden states of the (packed) batch and the lm_head weight go into ``sequence_logprobs``, so no
``[tokens × vocab]`` logits are built. One forward of all ``R·B`` rows of a role-major batch
gives ``[R, B]`` Σ log p; the loss's input dataclass is built from them here.

Held-out preference accuracy is how often the objective's implicit reward ranks the better
response first (ties count ½, so a policy equal to its reference scores 0.5):
- pair losses: reward(chosen) > reward(rejected), reward = Σ log π − Σ log π_ref with a
  reference, else the token-mean log π;
- lipo: over every pair of responses of a list with different scores;
- kto (unpaired): AUC — over all (desirable, undesirable) pairs of the eval set;
- sft (no rejected response): log π(completion_i | prompt_i) above log π(completion_i | prompt_j),
  the same completion after the next eval example's (different) prompt — did the model learn to
  condition on the prompt? (Same tokens scored twice, so the completion's own likelihood cancels.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastpref import losses
from fastpref.constants import IGNORE_INDEX
from fastpref.data import pad_and_label
from fastpref.errors import ConfigError
from fastpref.families import lm_formats
from fastpref.families.base import (
    Dist,
    EvalResult,
    Model,
    Objective,
    StepResult,
    WeightedMeans,
    batch_to_device,
    gather_objects,
    rank_slices,
)
from fastpref.losses import KTOLogps, ListLogps, PairLogps, SFTLogps
from fastpref.losses.metrics import pairwise_correct
from fastpref.models import (
    PolicyLogps,
    build_or_load_causal_lm,
    check_model_path,
    load_tokenizer,
    model_identity,
)

__all__ = ["FAMILY", "LMPreference", "accuracy_parts", "kto_auc", "mismatched_completions"]

BUILT_MODEL_LR = 2e-3  # the bundled tiny Llama trains from scratch: a large step is right
EMBEDDED_STEPS = 60  # bundled model and data: enough for >= 0.9 held-out accuracy in minutes
_PREF_LR = 5e-7  # a pretrained policy: TRL's DPO default range

# --loss, data format, reads a reference, default lr for a pretrained model
OBJECTIVES = tuple(
    Objective(name, getattr(losses, name), fmt, needs_reference, lr, lm_formats.COLUMNS[fmt])
    for name, fmt, needs_reference, lr in (
        ("sft", "sft", False, 1e-5),
        *((name, "pair", True, _PREF_LR) for name in ("dpo", "cdpo", "robust", "ipo", "hinge")),
        *((name, "pair", False, _PREF_LR) for name in ("simpo", "cpo", "orpo")),
        ("kto", "kto", True, _PREF_LR),
        ("rdpo", "pair_rationale", True, _PREF_LR),
        ("rorpo", "pair_rationale", False, _PREF_LR),
        ("lipo", "list", True, _PREF_LR),
    )
)


def _dtype(cfg: Any) -> torch.dtype | None:
    return torch.bfloat16 if cfg.bf16 else None


def _model_kwargs(cfg: Any, tokenizer: Any) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        seed=cfg.seed,
        attn=cfg.attn_implementation,
        dtype=_dtype(cfg),
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle=cfg.allow_pickle,
    )


class LMData:
    """Rows, tokens and batches of one LM format in one run (the LM and reward tasks share it):
    the tokenizer is ``--tokenizer``'s, else ``--model``'s, else the bundled one, loaded on
    first use."""

    def __init__(self, cfg: Any, fmt: str) -> None:
        check_model_path(cfg.model, "model")
        check_model_path(cfg.tokenizer, "tokenizer")
        self.cfg, self.fmt, self._tokenizer = cfg, fmt, None
        self.default_data = lm_formats.default_data(fmt)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            flag = "tokenizer" if self.cfg.tokenizer else "model"
            self._tokenizer = load_tokenizer(self.cfg.tokenizer or self.cfg.model, flag)
        return self._tokenizer

    def read(self, source: str, columns: dict[str, str] | None) -> list[dict]:
        return lm_formats.load_rows(source, self.fmt, columns=columns)

    def tokenize(self, rows: Sequence[dict], source: str) -> list[dict]:
        return lm_formats.tokenize_rows(
            rows, self.fmt, self.tokenizer, max_length=self.cfg.max_length, source=source
        )

    def collate(self, examples: Sequence[dict]) -> dict:
        return lm_formats.collate(examples, self.fmt, self.tokenizer.pad_token_id)


class LMPreference:
    name = "lm-preference"
    summary = "causal LM, fused log-probs of the completion tokens"
    objectives = OBJECTIVES
    options = ()

    def start(self, objective: Objective, cfg: Any, hparams: dict[str, object]) -> LMTask:
        return LMTask(objective, cfg, hparams)


FAMILY = LMPreference()


class LMTask:
    """One run of one LM-preference objective."""

    def __init__(self, objective: Objective, cfg: Any, hparams: dict[str, object]) -> None:
        self.data = LMData(cfg, objective.fmt)
        no_ref = cfg.ref_model is not None and cfg.ref_model.lower() == "none"
        if objective.needs_reference and no_ref:
            raise ConfigError(
                f"--loss {objective.name} needs a reference model but --ref-model is 'none': "
                "pass --ref-model PATH, or leave it unset to use the initial policy"
            )
        if cfg.ref_model is not None and not no_ref:
            check_model_path(cfg.ref_model, "ref-model")
        self.objective, self.cfg, self.hparams = objective, cfg, hparams
        self.fmt = objective.fmt
        self.metric_name = (
            "prompt-conditioning accuracy" if objective.name == "sft" else "preference accuracy"
        )
        self.default_data = self.data.default_data
        self.default_lr = BUILT_MODEL_LR if cfg.model is None else objective.lr
        self.embedded_steps = EMBEDDED_STEPS
        self.policy: nn.Module | None = None
        self.ref_tables: dict[str, Tensor] = {}
        self.ref_model: nn.Module | None = None  # the frozen reference for --ref-in-pass
        self.mismatched: list | None = None  # sft: eval completions after another prompt

    @property
    def tokenizer(self):
        return self.data.tokenizer

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    # ------------------------------------------------------------------------------ data
    def read(self, source: str, columns: dict[str, str] | None) -> list[dict]:
        return self.data.read(source, columns)

    def prepare(self, rows: Sequence[dict], source: str, split: str) -> list[dict]:
        examples = self.data.tokenize(rows, source)
        if split == "eval" and self.objective.name == "sft":
            self.mismatched = mismatched_completions(examples, self.fmt, self.pad_id)
        return examples

    def collate(self, examples: Sequence[dict]) -> dict:
        return self.data.collate(examples)

    # ------------------------------------------------------------------------------ model
    def build_model(self, dist: Dist) -> Model:
        self.policy = build_or_load_causal_lm(
            self.cfg.model, **_model_kwargs(self.cfg, self.tokenizer)
        )
        module = PolicyLogps(self.policy, zero_stage=self.cfg.zero_stage)
        vocab = self.policy.get_input_embeddings().num_embeddings
        return Model(module=module, vocab=vocab, hf_model=self.policy)

    def reference_scorer(self, dist: Dist) -> tuple[nn.Module, str] | None:
        """The frozen reference (the initial policy unless --ref-model) and its cache identity."""
        if not self.objective.needs_reference:
            return None
        if self.cfg.ref_model is None:  # the reference is the initial policy
            ref_lm = copy.deepcopy(self.policy) if self.cfg.ref_in_pass else self.policy
            ref_path = self.cfg.model
        else:
            ref_lm = build_or_load_causal_lm(
                self.cfg.ref_model, **_model_kwargs(self.cfg, self.tokenizer), flag="ref-model"
            )
            ref_path = self.cfg.ref_model
        settings = {
            "format": self.fmt,
            "dtype": str(_dtype(self.cfg)),
            "softcap": getattr(ref_lm.config, "final_logit_softcapping", None),
        }
        identity = f"{model_identity(ref_path, ref_lm)}|{sorted(settings.items())}"
        return PolicyLogps(ref_lm).to(dist.device), identity

    def reference_values(self, scorer: nn.Module, batch: dict) -> Tensor:
        """``[B, R_ref]`` Σ log π_ref of each example's leading roles."""
        B = batch["batch_size"]
        n = lm_formats.reference_roles(self.fmt, batch["num_roles"]) * B
        # Every row goes through the scorer, as in evaluation, even where the loss needs the
        # reference of only some roles (rdpo's rationale): packed batches of other rows round
        # differently, and a policy equal to its reference must tie with it exactly.
        logps, _ = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return logps[:n].view(-1, B).T

    def use_reference(self, split: str, table: Tensor | None, scorer: nn.Module | None) -> None:
        if scorer is not None:
            self.ref_model = scorer.eval().requires_grad_(False)
        else:
            self.ref_tables[split] = table

    # ------------------------------------------------------------------------------ step
    def _reference(self, batch: dict, split: str) -> Tensor | None:
        """Reference Σ log p, ``[R_ref, B]``, from the precomputed table or the in-pass model."""
        if not self.objective.needs_reference:
            return None
        R, B = batch["num_roles"], batch["batch_size"]
        rows = lm_formats.reference_roles(self.fmt, R)
        if self.ref_model is not None:
            with torch.no_grad():
                logps, _ = self.ref_model(
                    batch["input_ids"][: rows * B],
                    batch["attention_mask"][: rows * B],
                    batch["labels"][: rows * B],
                )
            return logps.view(rows, B)
        table = self.ref_tables[split]  # [n, R_ref], on the device
        ref = table[batch["example_ids"]][:, :rows]  # [B, rows] (list: padding columns are 0)
        if ref.shape[1] < rows:
            ref = torch.nn.functional.pad(ref, (0, rows - ref.shape[1]))
        return ref.T.contiguous()

    def forward(self, model: nn.Module, batch: dict, split: str):
        """``(loss, metrics, values [R, B], tokens [R, B], ref [R_ref, B] | None)``."""
        R, B = batch["num_roles"], batch["batch_size"]
        values, tokens = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        values, tokens = values.view(R, B), tokens.view(R, B)
        ref = self._reference(batch, split)
        inputs = loss_inputs(self.fmt, batch, values, tokens, ref)
        loss, metrics = self.objective.fn(inputs, **self.hparams)
        return loss, metrics.as_dict(), values, tokens, ref

    def step(self, model: nn.Module, batch: dict, split: str) -> StepResult:
        loss, metrics, _, tokens, _ = self.forward(model, batch, split)
        return StepResult(loss=loss, metrics=metrics, tokens=tokens.sum())

    # ------------------------------------------------------------------------------ eval
    def accuracy_parts(self, batch: dict, values: Tensor, tokens: Tensor, ref: Tensor | None):
        return accuracy_parts(self.objective, batch, values, tokens, ref)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[dict], dist: Dist) -> EvalResult:
        if self.mismatched is not None:
            return _evaluate_sft(self, model, examples, dist)
        return evaluate_preferences(self, model, examples, dist, auc=self.fmt == "kto")

    # ------------------------------------------------------------------------------ save
    def save(self, module: nn.Module, out_dir: Path, state_dict: dict | None) -> None:
        module.model.save_pretrained(out_dir, state_dict=state_dict)
        self.tokenizer.save_pretrained(out_dir)


def loss_inputs(fmt: str, batch: dict, values: Tensor, tokens: Tensor, ref: Tensor | None):
    """``[R, B]`` policy values (and ``[R_ref, B]`` reference) -> the loss's input dataclass."""
    if fmt == "sft":
        return SFTLogps(logps=values[0], tokens=tokens[0])
    if fmt == "kto":
        return KTOLogps(
            completion=values[0],
            completion_tokens=tokens[0],
            kl=values[1],
            kl_tokens=tokens[1],
            label=batch["kto_label"],
            ref_completion=None if ref is None else ref[0],
            ref_kl=None if ref is None else ref[1],
        )
    if fmt == "list":
        return ListLogps(
            logps=values.T,
            tokens=tokens.T,
            scores=batch["scores"],
            mask=batch["list_mask"],
            ref_logps=None if ref is None else ref.T,
        )
    rationale = fmt == "pair_rationale"
    return PairLogps(
        chosen=values[0],
        rejected=values[1],
        chosen_tokens=tokens[0],
        rejected_tokens=tokens[1],
        ref_chosen=None if ref is None else ref[0],
        ref_rejected=None if ref is None else ref[1],
        rationale=values[2] if rationale else None,
        rationale_tokens=tokens[2] if rationale else None,
    )


def implicit_rewards(values: Tensor, tokens: Tensor, ref: Tensor | None) -> Tensor:
    """The reward the objective implicitly ranks by, ``[R_ref, B]``.

    Reference-based: Σ log π − Σ log π_ref (β only scales it). Reference-free (SimPO, CPO,
    ORPO, RORPO) and SFT: the token-mean log-prob.
    """
    if ref is not None:
        return values[: ref.shape[0]] - ref
    return values / tokens.clamp(min=1)


def accuracy_parts(
    objective: Objective, batch: dict, values: Tensor, tokens: Tensor, ref: Tensor | None
) -> tuple[float, float, list]:
    """``(correct, pairs, kto_records)`` for held-out preference accuracy.

    pair formats: pairs = examples, correct = [reward(chosen) > reward(rejected)].
    lipo: every pair (i, j) of a list with score_i > score_j counts, correct when the implicit
    reward orders it the same way. kto (unpaired): returns ``(reward, label)`` records; the
    accuracy is the AUC (:func:`kto_auc`). Ties count ½ everywhere (``pairwise_correct``).
    """
    rewards = implicit_rewards(values, tokens, ref)
    if objective.fmt == "kto":
        return 0.0, 0.0, list(zip(rewards[0].tolist(), batch["kto_label"].tolist(), strict=True))
    if objective.fmt == "list":
        r, s, m = rewards.T, batch["scores"], batch["list_mask"]  # [B, K]
        pairs = (s[:, :, None] > s[:, None, :]) & m[:, :, None] & m[:, None, :]
        correct = pairwise_correct(r[:, :, None] - r[:, None, :])
        return float((correct * pairs).sum()), float(pairs.sum()), []
    correct = pairwise_correct(rewards[0] - rewards[1])
    return float(correct.sum()), float(correct.numel()), []


def kto_auc(records: list) -> float:
    """Fraction of (desirable, undesirable) pairs with the desirable reward higher (ties ½)."""
    pos = torch.tensor([r for r, y in records if y], dtype=torch.float64)
    neg = torch.tensor([r for r, y in records if not y], dtype=torch.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(pairwise_correct(pos[:, None] - neg[None, :]).mean())


def evaluate_preferences(task, model, examples: list[dict], dist: Dist, *, auc: bool = False):
    """Eval loss, the loss's metrics and preference accuracy over ``examples`` (all ranks).

    ``task`` gives ``collate``, ``forward(model, batch, "eval") -> (loss, metrics, values,
    tokens, ref)`` and ``accuracy_parts(batch, values, tokens, ref)`` (the reward family
    evaluates through this too); ``auc``: accuracy is the AUC of the (reward, label) records.
    """
    model.eval()
    means, correct, pairs, records = WeightedMeans(), 0.0, 0.0, []
    for idx, weight in rank_slices(len(examples), 2 * task.cfg.micro_batch, dist):
        batch = batch_to_device(task.collate([examples[i] for i in idx]), dist.device)
        loss, metrics, values, tokens, ref = task.forward(model, batch, "eval")
        means.add({"loss": loss, **metrics}, weight * len(idx))
        if weight:
            c, p, recs = task.accuracy_parts(batch, values, tokens, ref)
            correct, pairs, records = correct + c, pairs + p, records + recs
    parts = gather_objects((correct, pairs, records), dist)
    if auc:
        accuracy = kto_auc([r for p in parts for r in p[2]])
    else:
        total = sum(p[1] for p in parts)
        accuracy = sum(p[0] for p in parts) / total if total else float("nan")
    model.train()
    out = means.merged(dist)
    return EvalResult(loss=out.pop("loss"), accuracy=accuracy, metrics=out)


# ---------------------------------------------------------------------------------------------
# sft: prompt-conditioning accuracy


def _prompt_completion(example: dict, fmt: str, pad_id: int) -> tuple[Tensor, Tensor]:
    batch = lm_formats.collate([example], fmt, pad_id)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    ids = ids[batch["attention_mask"][0].bool()]
    first = int((labels != IGNORE_INDEX).nonzero()[0])  # labels[t] = ids[t+1]
    return ids[: first + 1], ids[first + 1 :]


def mismatched_completions(examples: list[dict], fmt: str, pad_id: int) -> list[tuple[Tensor, int]]:
    """For sft: (prompt_j + completion_i, len(prompt_j)) for every eval example i, where j is the
    next example (cyclically) whose prompt differs from prompt_i (i itself if none does)."""
    parts = [_prompt_completion(e, fmt, pad_id) for e in examples]
    n, out = len(parts), []
    for i, (own, completion) in enumerate(parts):
        others = (parts[(i + k) % n][0] for k in range(1, n))
        prompt = next((p for p in others if not torch.equal(p, own)), own)
        out.append((torch.cat([prompt, completion]), len(prompt)))
    return out


def collate_sequences(seqs: list[tuple[Tensor, int]], pad_id: int) -> dict:
    """``(ids, prompt length)`` sequences -> a padded batch labelled on the completion."""
    input_ids, attention_mask, labels = pad_and_label(seqs, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _evaluate_sft(task: LMTask, model, examples: list[dict], dist: Dist) -> EvalResult:
    model.eval()
    means, correct, pairs = WeightedMeans(), 0.0, 0.0
    for idx, weight in rank_slices(len(examples), 2 * task.cfg.micro_batch, dist):
        batch = batch_to_device(task.collate([examples[i] for i in idx]), dist.device)
        loss, metrics, values, _, _ = task.forward(model, batch, "eval")
        means.add({"loss": loss, **metrics}, weight * len(idx))
        other = batch_to_device(
            collate_sequences([task.mismatched[i] for i in idx], task.pad_id), dist.device
        )
        wrong, _ = model(other["input_ids"], other["attention_mask"], other["labels"])
        c = pairwise_correct(values[0] - wrong)  # the same completion tokens under two prompts
        correct, pairs = correct + weight * float(c.sum()), pairs + weight * len(idx)
    parts = gather_objects((correct, pairs), dist)
    total = sum(p[1] for p in parts)
    model.train()
    out = means.merged(dist)
    accuracy = sum(p[0] for p in parts) / total if total else float("nan")
    return EvalResult(loss=out.pop("loss"), accuracy=accuracy, metrics=out)
