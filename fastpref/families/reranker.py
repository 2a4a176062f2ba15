"""The LLM listwise reranker family: ``--loss rankllm``, RankLLM's training (RankZephyr, FIRST).

A causal LM reads RankZephyr's prompt over up to ``--window`` numbered passages and learns the
gold permutation (``fastpref.losses.rankllm``): ``--objective generation`` (LM of
``"[B] > [A] > …"``), ``ranking`` (FIRST: ``--ranking-loss`` over the K identifier logits at the
first generated position, ``--weighted`` for FIRST's pair weights) or ``combined`` (LM +
λ·ranking from one forward, λ = ``--ranking-weight``). Formats, the prompt and the identifiers are
in ``fastpref.families.reranker_formats``; the model adapter is
``fastpref.models.rerank.ListwiseRanker`` (fused log-probs of the target, identifier rows of the
lm_head only). ``--neftune-alpha`` adds NEFTune noise to the input embeddings in training.

Held-out evaluation reranks each held-out list: a plain list by sliding windows (``--window``,
``--stride``, back to front) ordered by FIRST scores (``--decode``: by greedy decoding of the
permutation, its repairs counted in ``eval/decode/...``), a conversation's prompt in one window;
the headline metric is nDCG@10 by trec_eval (``pytrec_eval``), beside nDCG@5 and MRR@10 and the
same metrics of the first-stage (input) order (``eval/first_stage/...``). The eval loss is the
objective on the held-out lists' first-stage windows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastpref.data.ir import MRR_AT_10, evaluate_rankings
from fastpref.errors import ConfigError
from fastpref.families import reranker_formats as rf
from fastpref.families.base import (
    Dist,
    EvalResult,
    Model,
    Objective,
    Option,
    StepResult,
    WeightedMeans,
    batch_to_device,
    gather_objects,
    rank_slices,
)
from fastpref.losses.rankllm import RankLLMOutputs, rankllm
from fastpref.models import build_or_load_causal_lm, check_model_path, load_tokenizer
from fastpref.models.rerank import (
    ListwiseRanker,
    Repairs,
    Window,
    decode_orders,
    first_orders,
    sliding_window_rerank,
)
from fastpref.paths import ASSETS, bundled_data

__all__ = ["FAMILY", "Reranker", "RerankTask", "ir_metrics", "write_trec_run"]

BUILT_MODEL_LR = 2e-3  # the bundled tiny Llama trains from scratch
EMBEDDED_STEPS = 150  # bundled model and data: nDCG@10 well above the first stage in minutes
DEFAULT_DATA = "rerank.jsonl"
# the bundled tiny Llama's tokenizer for this family: the bundled BPE's size and special tokens,
# trained on the reranking prompts (scripts/make_assets.py): a 20-passage prompt is ~340 tokens,
# ~550 with the bundled one
BUNDLED_TOKENIZER = ASSETS / "tokenizer_rerank"
RERANK_CONFIG = "rerank_config.json"  # saved beside the model: how its prompts were built
METRICS = {"nDCG@10": "ndcg_cut_10", "nDCG@5": "ndcg_cut_5", "MRR@10": MRR_AT_10}


def _at_least(n: int):
    return lambda v: None if v >= n else f"must be >= {n}"


OPTIONS = (
    Option(
        "identifiers",
        str,
        "alpha",
        "passage identifiers: alpha ([A]..[Z]) or numeric ([1]..); each one token after '['",
        choices=tuple(rf.IDENTIFIERS),
    ),
    Option(
        "max_passage_words", int, 300, "words kept of each passage in a prompt", check=_at_least(1)
    ),
    Option(
        "context_size",
        int,
        4096,
        "max tokens of prompt + target (replaces --max-length for rankllm)",
        check=_at_least(16),
    ),
    Option("window", int, 20, "passages per prompt: sliding window size", check=_at_least(2)),
    Option("stride", int, 10, "sliding window stride (back to front)", check=_at_least(1)),
    Option(
        "neftune_alpha",
        float,
        0.0,
        "NEFTune α: U(±α/√(L·d)) noise on the input embeddings in training (0: off)",
        check=lambda v: None if v >= 0 else "must be >= 0",
    ),
    Option(
        "decode",
        bool,
        False,
        "held-out eval reranks by greedy decoding of the permutation instead of FIRST scores "
        "(repairs counted in eval/decode/...)",
    ),
)


class Reranker:
    name = "reranker"
    summary = "causal LM listwise reranker (RankZephyr / FIRST), sliding-window nDCG@10"
    # rank_llm's default lr 5e-6 for a pretrained model
    objectives = (Objective("rankllm", rankllm, rf.FORMAT, False, 5e-6, rf.COLUMNS),)
    options = OPTIONS

    def start(self, objective: Objective, cfg: Any, hparams: dict[str, object]) -> RerankTask:
        return RerankTask(objective, cfg, hparams)


FAMILY = Reranker()


def rerank_settings(cfg: Any) -> dict:
    """The options that decide how prompts are built (saved with the model)."""
    return {name: getattr(cfg, name) for name in ("identifiers", "max_passage_words", "window")}


class RerankTask:
    """One ``--loss rankllm`` run."""

    def __init__(self, objective: Objective, cfg: Any, hparams: dict[str, object]) -> None:
        check_model_path(cfg.model, "model")
        check_model_path(cfg.tokenizer, "tokenizer")
        default_max_length = type(cfg).__dataclass_fields__["max_length"].default
        if cfg.max_length != default_max_length:
            raise ConfigError(
                "--max-length does not apply to --loss rankllm (a ranking prompt is never cut "
                "from its start); use --context-size, and --max-passage-words to shorten passages"
            )
        if cfg.stride > cfg.window:
            raise ConfigError(
                f"--stride {cfg.stride} is larger than --window {cfg.window}: "
                "some passages would never be reranked"
            )
        if cfg.decode and cfg.zero_stage == 3:
            raise ConfigError(
                "--decode does not run under --zero-stage 3 (each rank's generate() would gather "
                "the partitioned weights a different number of times); evaluate by FIRST scores, "
                "or run fastpref-rerank --decode on the saved model"
            )
        self.objective, self.cfg, self.hparams = objective, cfg, hparams
        settings = {**objective.hparams(), **hparams}
        try:  # a bad combination (e.g. --weighted with listnet) fails now, not at step 1
            rankllm(_probe(), **settings)
        except ValueError as e:
            raise ConfigError(f"--loss rankllm: {e}") from None
        self.mode = settings["objective"]
        self.metric_name = "nDCG@10"
        self.default_data = bundled_data(DEFAULT_DATA)
        self.default_lr = BUILT_MODEL_LR if cfg.model is None else objective.lr
        self.embedded_steps = EMBEDDED_STEPS
        self._tokenizer = None
        self._encoder: rf.PromptEncoder | None = None
        self.hf_model: nn.Module | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            path = self.cfg.tokenizer or self.cfg.model
            self._tokenizer = load_tokenizer(path if path is not None else str(BUNDLED_TOKENIZER))
        return self._tokenizer

    @property
    def encoder(self) -> rf.PromptEncoder:
        if self._encoder is None:
            self._encoder = make_encoder(self.tokenizer, self.cfg, self.mode != "ranking")
        return self._encoder

    # ------------------------------------------------------------------------------ data
    def read(self, source: str, columns: dict[str, str] | None) -> list[dict]:
        return rf.load_rows(source, self.cfg.identifiers, columns)

    def prepare(self, rows: Sequence[dict], source: str, split: str) -> list[dict]:
        windows = [
            training_windows(self.encoder, row, i, source, self.cfg) for i, row in enumerate(rows)
        ]
        if split == "train":
            return [w for ws in windows for w in ws]
        return [
            {"example_id": i, "row": row, "windows": ws}
            for i, (row, ws) in enumerate(zip(rows, windows, strict=True))
        ]

    def collate(self, examples: Sequence[dict]) -> dict:
        return rf.collate(examples, self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------ model
    def build_model(self, dist: Dist) -> Model:
        cfg = self.cfg
        self.hf_model = build_or_load_causal_lm(
            cfg.model,
            vocab_size=len(self.tokenizer),
            seed=cfg.seed,
            attn=cfg.attn_implementation,
            dtype=torch.bfloat16 if cfg.bf16 else None,
            trust_remote_code=cfg.trust_remote_code,
        )
        module = ListwiseRanker(
            self.hf_model, zero_stage=cfg.zero_stage, neftune_alpha=cfg.neftune_alpha
        )
        vocab = self.hf_model.get_input_embeddings().num_embeddings
        return Model(module=module, vocab=vocab, hf_model=self.hf_model)

    def reference_scorer(self, dist: Dist) -> None:
        return None  # RankLLM's objectives have no reference model

    def reference_values(self, scorer: nn.Module, batch: dict) -> Tensor:
        raise NotImplementedError("rankllm has no reference")

    def use_reference(self, split: str, table: Tensor | None, scorer: nn.Module | None) -> None:
        raise NotImplementedError("rankllm has no reference")

    # ------------------------------------------------------------------------------ step
    def forward(self, model: nn.Module, batch: dict):
        gen, rank = self.mode != "ranking", self.mode != "generation"
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"] if gen else None,
            batch["first_pos"] if rank else None,
            batch["id_tokens"] if rank else None,
        )
        inputs = RankLLMOutputs(
            relevance=batch["relevance"],
            mask=batch["mask"],
            logps=out.logps,
            tokens=out.tokens if gen else None,
            scores=out.scores,
        )
        loss, metrics = self.objective.fn(inputs, **self.hparams)
        return loss, metrics.as_dict()

    def step(self, model: nn.Module, batch: dict, split: str) -> StepResult:
        loss, metrics = self.forward(model, batch)
        # tokens/s counts every token through the model: the prompt is most of a step's work
        return StepResult(loss=loss, metrics=metrics, tokens=batch["attention_mask"].sum())

    # ------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[dict], dist: Dist) -> EvalResult:
        model.eval()
        flat = [w for e in examples for w in e["windows"]]
        means = WeightedMeans()
        for idx, weight in rank_slices(len(flat), 2 * self.cfg.micro_batch, dist):
            batch = batch_to_device(self.collate([flat[i] for i in idx]), dist.device)
            loss, metrics = self.forward(model, batch)
            means.add({"loss": loss, **metrics}, weight * len(idx))
        rows = [e["row"] for e in examples]
        decoder = self.hf_model if self.cfg.decode else None
        orders, repairs = rerank_rows(
            model, rows, self.encoder, self.cfg, dist, self.tokenizer, decoder
        )
        model.train()
        after, before = ir_metrics(rows, orders), ir_metrics(rows, None)
        out = means.merged(dist)
        metrics = {**out, **{k: v for k, v in after.items() if k != "nDCG@10"}}
        metrics.update({f"first_stage/{k}": v for k, v in before.items()})
        if repairs is not None:
            metrics.update({f"decode/{k}": float(v) for k, v in repairs.counts().items()})
        return EvalResult(loss=out.pop("loss"), accuracy=after["nDCG@10"], metrics=metrics)

    # ------------------------------------------------------------------------------ save
    def save(self, module: nn.Module, out_dir: Path, state_dict: dict | None) -> None:
        module.model.save_pretrained(out_dir, state_dict=state_dict)
        self.tokenizer.save_pretrained(out_dir)
        settings = {**rerank_settings(self.cfg), "stride": self.cfg.stride}
        settings["context_size"] = self.cfg.context_size
        (out_dir / RERANK_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")


def _probe() -> RankLLMOutputs:
    """Two-passage inputs every objective accepts (to check hyperparameters up front)."""
    return RankLLMOutputs(
        relevance=torch.tensor([[1.0, 0.0]]),
        mask=torch.ones(1, 2, dtype=torch.bool),
        logps=torch.zeros(1),
        tokens=torch.ones(1),
        scores=torch.zeros(1, 2),
    )


def make_encoder(tokenizer: Any, cfg: Any, with_target: bool) -> rf.PromptEncoder:
    """Prompts of ``cfg``'s identifiers, passage cap and context size for ``tokenizer``."""
    identifiers = rf.Identifiers(tokenizer, cfg.identifiers)
    identifiers.tokens(min(cfg.window, len(identifiers.names)))  # fails early, naming one
    return rf.PromptEncoder(
        tokenizer,
        identifiers,
        max_passage_words=cfg.max_passage_words,
        context_size=cfg.context_size,
        with_target=with_target,
    )


def training_windows(enc: rf.PromptEncoder, row: dict, i: int, source: str, cfg: Any) -> list:
    """The tokenised prompts of one row: a conversation's own, or a plain list's windows in
    first-stage order."""
    where = f"{source}: qid {row['qid']}"
    if row["kind"] == "conversation":
        return [enc.example(row, i, None, where)]
    spans = rf.window_spans(len(row["docids"]), cfg.window, cfg.stride)
    return [enc.example(row, i, list(range(a, b)), where) for a, b in spans]


def row_spans(row: dict, cfg: Any) -> list[tuple[int, int]]:
    n = len(row["docids"])
    return [(0, n)] if row["kind"] == "conversation" else rf.window_spans(n, cfg.window, cfg.stride)


def _window(enc: rf.PromptEncoder, rows: Sequence[dict], q: int, passages: list[int]) -> Window:
    row = rows[q]
    ids = enc.prompt_ids(row, None if row["kind"] == "conversation" else passages)
    return Window(prompt_ids=ids, id_tokens=enc.ids.tokens(len(passages)))


def rerank_rows(
    ranker: nn.Module,
    rows: Sequence[dict],
    enc: rf.PromptEncoder,
    cfg: Any,
    dist: Dist,
    tokenizer: Any,
    decoder: nn.Module | None = None,
) -> tuple[list[list[int]], Repairs | None]:
    """Every row's reranked order (all ranks get all rows): windows ordered by ``ranker``'s
    FIRST scores, or, given ``decoder`` (the causal LM inside ``ranker``), by greedy decoding of
    the permutation (``decode_orders``), whose repairs are returned summed over the ranks (None
    for FIRST). Used by the trainer's eval and ``fastpref-rerank``. Each rank reranks its share
    of the rows, running as many FIRST forwards as every other rank (ZeRO-3 gathers
    collectively)."""
    pad_id = tokenizer.pad_token_id
    dummy = []  # what a rank with nothing left runs while the others still rerank
    if dist.world_size > 1 and rows:
        dummy = [_window(enc, rows, 0, list(range(*row_spans(rows[0], cfg)[0])))]
    repairs = Repairs() if decoder is not None else None

    def first(windows: list[Window]) -> list[list[int]]:
        if not windows:
            if dummy:
                first_orders(ranker, dummy, enc.ids.open_ids, pad_id, dist.device)
            return []
        return first_orders(ranker, windows, enc.ids.open_ids, pad_id, dist.device)

    def decode(windows: list[Window]) -> list[list[int]]:
        return decode_orders(decoder, windows, tokenizer, enc.ids.names, dist.device, repairs)

    order_windows = first if decoder is None else decode
    batch = 2 * cfg.micro_batch
    mine: dict[int, list[int]] = {}
    step = batch * dist.world_size
    for start in range(0, len(rows), step):
        group = list(range(start, min(start + step, len(rows))))
        own = group[dist.rank * batch : (dist.rank + 1) * batch]
        steps = max(len(row_spans(rows[q], cfg)) for q in group)
        if not own:
            for _ in range(steps):
                order_windows([])
            continue
        orders = sliding_window_rerank(
            [row_spans(rows[q], cfg) for q in own],
            partial(_window, enc, [rows[q] for q in own]),
            order_windows,
            batch_size=len(own),
            steps=steps,
        )
        mine.update(zip(own, orders, strict=True))
    merged: dict[int, list[int]] = {}
    total = Repairs() if decoder is not None else None
    for part, rep in gather_objects((mine, repairs), dist):
        merged.update(part)
        if total is not None:
            total.add(rep)
    return [merged[q] for q in range(len(rows))], total


def ir_metrics(rows: Sequence[dict], orders: Sequence[list[int]] | None) -> dict[str, float]:
    """Mean nDCG@10, nDCG@5 and MRR@10 over ``rows`` by trec_eval (``fastpref.data.ir``) for the
    given orders (None: the first-stage order). Gains are trec_eval's: the integer relevance."""
    qrels = {
        r["qid"]: {d: int(round(g)) for d, g in zip(r["docids"], r["relevance"], strict=True)}
        for r in rows
    }
    rankings = {}
    for i, r in enumerate(rows):
        order = range(len(r["docids"])) if orders is None else orders[i]
        rankings[r["qid"]] = [r["docids"][j] for j in order]
    table = evaluate_rankings(qrels, rankings, {"ndcg_cut.5,10", MRR_AT_10})
    out = {}
    for name, measure in METRICS.items():
        values = [v[measure] for v in table.values() if measure in v]
        out[name] = sum(values) / len(values) if values else float("nan")
    return out


def write_trec_run(
    path: Path, rows: Sequence[dict], orders: Sequence[list[int]] | None, tag: str
) -> None:
    """A TREC run file, ``qid Q0 docid rank score tag`` (rank from 1, score = n − rank + 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            order = range(len(r["docids"])) if orders is None else orders[i]
            n = len(order)
            for k, j in enumerate(order):
                f.write(f"{r['qid']} Q0 {r['docids'][j]} {k + 1} {n - k} {tag}\n")
