"""A causal LM as a listwise reranker: FIRST's single-token identifier scores, the fused
generation log-probs of a permutation, NEFTune, and reranking by sliding windows.

``ListwiseRanker`` runs the backbone once and gives what RankLLM's objectives need from that one
forward: Σ log p of the target permutation through ``fastpref.sequence_logprobs`` (only target
positions meet the vocabulary) and the logits of the K identifier tokens at the first generated
position, ``s_k = h_first · w_k`` — ``hidden [B, D]`` against the ``[B, K, D]`` identifier rows of
the lm_head, never the full ``[V, D]`` weight. FIRST: https://arxiv.org/abs/2406.15657.

Reranking a candidate list (``sliding_window_rerank``) moves a window from the back of the list
to the front (RankZephyr); each window is ordered either by its FIRST scores (one forward, no
decoding) or by greedily decoding the permutation (``decode_orders``), whose invalid or repeated
identifiers are dropped and whose missing ones are appended in their original order
(``repair_permutation``, rank_llm's ``receive_permutation``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastpref.constants import IGNORE_INDEX
from fastpref.models.causal_lm import backbone, lm_head
from fastpref.ops import sequence_logprobs

__all__ = [
    "ListwiseRanker",
    "RankerOutput",
    "Repairs",
    "Window",
    "decode_orders",
    "first_orders",
    "neftune_noise",
    "repair_permutation",
    "sliding_window_rerank",
]


@dataclass
class RankerOutput:
    """One forward of a batch of ranking prompts."""

    logps: Tensor | None  # [B] Σ log p of the labelled (target) tokens; None if not asked
    tokens: Tensor  # [B] labelled tokens (float)
    scores: Tensor | None  # [B, K] identifier logits at first_pos (fp32); None if not asked


def neftune_noise(embeds: Tensor, alpha: float) -> Tensor:
    """NEFTune (https://arxiv.org/abs/2310.05914): ``embeds + U(−a, a)``, a = α/√(L·d), L the
    padded sequence length (prompt included) and d the hidden size, as rank_llm and
    transformers apply it."""
    L, d = embeds.shape[-2], embeds.shape[-1]
    bound = alpha / math.sqrt(L * d)
    return embeds + torch.empty_like(embeds).uniform_(-bound, bound)


class ListwiseRanker(nn.Module):
    """``forward(input_ids, attention_mask, labels=None, first_pos=None, id_tokens=None)``.

    ``labels`` ``[B, T]`` aligned with the hidden states (``IGNORE_INDEX`` off the target, see
    ``fastpref.data.pad_and_label``) give ``logps`` = Σ log p of the target tokens, equal to
    ``model(input_ids).logits.log_softmax(-1).gather(-1, labels)`` summed without the
    ``[B, T, V]`` logits. ``first_pos [B]`` and ``id_tokens [B, K]`` give ``scores`` equal to
    ``model(input_ids).logits[b, first_pos[b], id_tokens[b]]`` (softcap included) from K rows
    of the lm_head. ``neftune_alpha > 0`` adds NEFTune noise to the input embeddings in training
    mode only. The wrapper is what DeepSpeed wraps (under ZeRO-3 the lm_head weight is an
    external parameter, gathered for the fused op).
    """

    def __init__(self, model: nn.Module, *, zero_stage: int = 0, neftune_alpha: float = 0.0):
        super().__init__()
        self.model, self.neftune_alpha = model, float(neftune_alpha)
        if zero_stage == 3:
            import deepspeed

            head = lm_head(model)
            deepspeed.zero.register_external_parameter(self, head.weight)
            if head.bias is not None:
                deepspeed.zero.register_external_parameter(self, head.bias)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        first_pos: Tensor | None = None,
        id_tokens: Tensor | None = None,
    ) -> RankerOutput:
        embeds = self.model.get_input_embeddings()(input_ids)  # [B, T, D]
        if self.training and self.neftune_alpha > 0:
            embeds = neftune_noise(embeds, self.neftune_alpha)
        hidden = backbone(self.model)(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # [B, T, D]
        head = lm_head(self.model)
        logps, tokens = None, torch.zeros(input_ids.shape[0], device=input_ids.device)
        if labels is not None:
            tokens = (labels != IGNORE_INDEX).sum(-1).float()
            logps = sequence_logprobs(hidden, head.weight, labels, head.bias, softcap=head.softcap)
        scores = None
        if first_pos is not None and id_tokens is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            h = hidden[rows, first_pos]  # [B, D]
            w = head.weight[id_tokens]  # [B, K, D]: the identifiers' rows only
            scores = torch.einsum("bd,bkd->bk", h, w.to(h.dtype)).float()
            if head.bias is not None:
                scores = scores + head.bias[id_tokens].float()
            if head.softcap:
                scores = head.softcap * torch.tanh(scores / head.softcap)
        return RankerOutput(logps=logps, tokens=tokens, scores=scores)


# ---------------------------------------------------------------------------------------------
# ordering windows


@dataclass
class Window:
    """One window's prompt (without the target's ``"["``) and its identifiers' token ids."""

    prompt_ids: list[int]
    id_tokens: list[int]


@dataclass
class Repairs:
    """What repairing decoded permutations had to do (counts over windows)."""

    windows: int = 0  # windows decoded
    repaired: int = 0  # windows whose output needed any repair
    invalid: int = 0  # identifiers named that are not in the window
    repeated: int = 0  # identifiers named again
    missing: int = 0  # identifiers never named (appended in original order)
    examples: list[str] = field(default_factory=list)  # a few raw outputs that needed repair

    COUNTS = ("windows", "repaired", "invalid", "repeated", "missing")

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COUNTS}

    def add(self, other: Repairs) -> None:
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples.extend(other.examples[: max(0, 3 - len(self.examples))])


def repair_permutation(
    named: Sequence[str], identifiers: Sequence[str]
) -> tuple[list[int], Repairs]:
    """Local order from the identifiers a model named: those not in ``identifiers`` and repeats
    are dropped, the ones never named follow in their original order."""
    index = {ident: j for j, ident in enumerate(identifiers)}
    out, seen, rep = [], set(), Repairs(windows=1)
    for ident in named:
        j = index.get(ident)
        if j is None:
            rep.invalid += 1
        elif j in seen:
            rep.repeated += 1
        else:
            seen.add(j)
            out.append(j)
    rep.missing = len(identifiers) - len(out)
    out += [j for j in range(len(identifiers)) if j not in seen]
    rep.repaired = int(bool(rep.invalid or rep.repeated or rep.missing))
    return out, rep


def _padded(windows: Sequence[Window], suffix: list[int], pad_id: int, device) -> dict:
    seqs = [w.prompt_ids + suffix for w in windows]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
    K = max(len(w.id_tokens) for w in windows)
    id_tokens = torch.zeros((len(windows), K), dtype=torch.long)
    for b, w in enumerate(windows):
        id_tokens[b, : len(w.id_tokens)] = torch.tensor(w.id_tokens)
    last = torch.tensor([len(s) - 1 for s in seqs])
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "first_pos": last.to(device),
        "id_tokens": id_tokens.to(device),
    }


@torch.no_grad()
def first_orders(
    ranker: nn.Module, windows: Sequence[Window], open_ids: list[int], pad_id: int, device
) -> list[list[int]]:
    """FIRST: each window's passages by descending identifier logit after ``prompt + "["`` —
    one forward for the whole batch of windows (ties keep the window's order)."""
    batch = _padded(windows, open_ids, pad_id, device)
    scores = ranker(**batch).scores.cpu()
    out = []
    for w, s in zip(windows, scores, strict=True):
        k = len(w.id_tokens)
        out.append(torch.argsort(-s[:k], stable=True).tolist())
    return out


@torch.no_grad()
def decode_orders(
    hf_model: nn.Module,
    windows: Sequence[Window],
    tokenizer,
    identifiers: Sequence[str],
    device,
    repairs: Repairs,
) -> list[list[int]]:
    """Greedy decoding of each window's permutation ``"[B] > [A] > …"`` (``generate()``, one
    window at a time, up to 6 tokens per identifier + 4), parsed and repaired."""
    out = []
    for w in windows:
        k = len(w.id_tokens)
        ids = torch.tensor([w.prompt_ids], device=device)
        gen = hf_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6 * k + 4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        text = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        order, rep = repair_permutation(re.findall(r"\[([^\[\]\s]+)\]", text), identifiers[:k])
        if rep.repaired:
            rep.examples.append(text[:200])
        repairs.add(rep)
        out.append(order)
    return out


def sliding_window_rerank(
    plans: Sequence[list[tuple[int, int]]],
    window_of: Callable[[int, list[int]], Window],
    order_windows: Callable[[list[Window]], list[list[int]]],
    *,
    batch_size: int,
    steps: int | None = None,
) -> list[list[int]]:
    """The reranked order (indices into each list) of the lists whose windows are ``plans``.

    ``plans[q]``: list q's windows ``(start, end)`` in the order they are applied (back to
    front, e.g. ``fastpref.families.reranker_formats.window_spans``); the list has
    ``max(end)`` candidates. ``window_of(q, candidates)`` builds the window of list q over
    those candidate indices (its current order); ``order_windows`` orders a batch of windows
    (local indices, best first). The j-th windows of up to ``batch_size`` lists go through one
    call. ``steps``: at least this many calls per group of lists (an empty batch once a group
    has no window left, so that every rank of a distributed eval runs as many forwards).
    """
    orders = [list(range(max(b for _, b in plan))) for plan in plans]
    for start in range(0, len(plans), batch_size):
        group = range(start, min(start + batch_size, len(plans)))
        n_steps = max([len(plans[q]) for q in group] + [steps or 0])
        for j in range(n_steps):
            todo = [q for q in group if j < len(plans[q])]
            windows = [window_of(q, orders[q][slice(*plans[q][j])]) for q in todo]
            local = order_windows(windows)
            for q, perm in zip(todo, local, strict=True):
                a, b = plans[q][j]
                chunk = orders[q][a:b]
                orders[q][a:b] = [chunk[p] for p in perm]
    return orders
