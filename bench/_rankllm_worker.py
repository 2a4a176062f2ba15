"""Worker for bench_reranker.py: rank_llm's combined training step, written as rank_llm computes it
(``training/utils/train_utils.py`` and ``loss.py`` of castorini/rank_llm, read, not imported:
rank_llm needs vLLM).

``python bench/_rankllm_worker.py BATCH.pt MODEL_DIR RESULT.json STEPS`` loads the Llama, then
per step: ``model(input_ids)`` builds the full ``[B, T, V]`` logits; the generation loss is the
token mean of ``-log_softmax(logits).gather(labels)`` over the target tokens; the ranking loss,
per sample, gathers the K identifier logits at the first target position, builds
``true_scores`` from the model's own sorted scores, and takes FIRST's weighted RankNet
(``BCEWithLogits`` over all ordered pairs with ``y_i > y_j``, weight ``1/(rank_i + rank_j)``,
mean reduction), averaged over the batch; loss = gen + 10 * rank; backward; AdamW step.
Records each step's wall/CPU time, the step-0 loss and the peak resident set (VmHWM).
"""

from __future__ import annotations

import json
import sys
import time
from itertools import product
from pathlib import Path

import torch
from _common import peak_rss_mb, require_native
from torch import nn


def generation_loss(logits, labels):
    """rank_llm ``compute_generation_loss`` (ε = 0): shifted token NLL, mean over targets."""
    logits = logits[..., :-1, :].contiguous()
    labels = labels[..., 1:].contiguous().unsqueeze(-1)
    log_probs = -nn.functional.log_softmax(logits, dim=-1)
    padding = labels.eq(-100)
    nll = log_probs.gather(dim=-1, index=torch.clamp(labels, min=0))
    nll.masked_fill_(padding, 0.0)
    return nll.sum() / (padding.numel() - padding.long().sum())


def rank_net_weighted(y_pred, y_true):
    """rank_llm ``rank_net(weighted=True)`` on one [1, K] list."""
    pairs = list(product(range(y_true.shape[1]), repeat=2))
    pairs_true, pred = y_true[:, pairs], y_pred[:, pairs]
    true_diffs = pairs_true[:, :, 0] - pairs_true[:, :, 1]
    pred_diffs = pred[:, :, 0] - pred[:, :, 1]
    mask = (true_diffs > 0) & (~torch.isinf(true_diffs))
    _, indices = torch.sort(y_true, descending=True)
    ranks = torch.zeros_like(indices)
    ranks.scatter_(1, indices, torch.arange(1, y_true.numel() + 1).view_as(indices))
    weight = 1 / ranks[:, pairs].sum(-1)[mask]
    target = (true_diffs > 0).float()[mask]
    return nn.BCEWithLogitsLoss(weight=weight)(pred_diffs[mask], target)


def ranking_loss(logits, rank_labels, source_lens, id_tokens):
    """rank_llm ``compute_ranking_loss`` with ``--ranking_loss ranknet --weighted``."""
    losses = torch.zeros(len(rank_labels))
    for b, true_rank in enumerate(rank_labels):
        pred = logits[b][source_lens[b]]  # logits after the target's "["
        scores = torch.gather(pred, 0, id_tokens[: len(true_rank)])
        scores_sorted, _ = scores.sort(descending=True, dim=-1)
        true_scores = torch.gather(scores_sorted, 0, torch.tensor(true_rank))
        losses[b] = rank_net_weighted(scores.unsqueeze(0), true_scores.unsqueeze(0))
    return losses.mean()


def main() -> int:
    require_native()
    batch_path, model_dir, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    from transformers import AutoModelForCausalLM

    batch = torch.load(batch_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    times, cpu_times, losses = [], [], []
    for _ in range(steps):
        start, cpu = time.perf_counter(), time.process_time()
        logits = model(batch["input_ids"]).logits  # no attention mask, right padding: rank_llm
        gen = generation_loss(logits, batch["labels"])
        rank = ranking_loss(logits, batch["rank_labels"], batch["source_lens"], batch["id_tokens"])
        loss = gen + 10.0 * rank
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        del logits, gen, rank, loss
    result = {
        "step_s": times,
        "step_cpu_s": cpu_times,
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }
    Path(out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
