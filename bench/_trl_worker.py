"""Worker for bench_train.py: train DPO with TRL's DPOTrainer in this process, write timings.

Run as ``python bench/_trl_worker.py --model DIR --examples FILE.jsonl --out RESULT.json ...``.
The examples are already tokenised by fastpref's data layer (one JSON object a line with
``prompt_ids``, ``chosen_ids``, ``rejected_ids``; EOS already at the end of each completion),
and TRL's own tokenisation is skipped, so both trainers see exactly the same token ids.
Everything else is TRL's: its collator (right padding, ``[chosen; rejected]`` batch), its fused
chunked LM head, its loss, the transformers Trainer loop and AdamW.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import peak_rss_mb
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer fed fastpref's token ids: skip TRL's prompt/EOS/tokenisation map."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: D102
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):  # noqa: D102
        start = time.perf_counter()
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        self.precompute_s = time.perf_counter() - start
        return out


class StepClock(TrainerCallback):
    """Wall clock and process CPU time (all threads) at the start of training and at the end of
    every optimizer step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [(time.perf_counter(), time.process_time())]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), time.process_time()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--examples", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--liger", action="store_true", help="use_liger_kernel=True")
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default")
    p.add_argument("--precompute-ref", action="store_true", help="precompute_ref_log_probs=True")
    p.add_argument("--bf16", action="store_true", help="bf16=True: autocast over fp32 weights")
    a = p.parse_args()

    t0 = time.perf_counter()
    rows = [json.loads(line) for line in Path(a.examples).read_text().splitlines() if line]
    dataset = Dataset.from_list(
        [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
    )
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    steps = len(rows) // a.micro_batch
    config = DPOConfig(
        output_dir=a.output_dir,
        per_device_train_batch_size=a.micro_batch,
        max_steps=steps,
        num_train_epochs=1,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        beta=a.beta,
        loss_type=["sigmoid"],
        max_length=a.max_length,
        bf16=a.bf16,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=a.gradient_checkpointing,
        precompute_ref_log_probs=a.precompute_ref,
        use_liger_kernel=a.liger,
        report_to="none",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        logging_first_step=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # the data order, as fastpref-train sees it
        dataloader_num_workers=0,
        seed=a.seed,
    )
    clock = StepClock()
    trainer = PretokenizedDPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    setup_s = time.perf_counter() - t0
    trainer.train()

    marks = clock.marks
    step_s = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
    step_cpu_s = [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    import trl

    result = {
        "trainer": "trl",
        "trl_version": trl.__version__,
        "setup_s": setup_s,
        "precompute_s": getattr(trainer, "precompute_s", None),
        "step_s": step_s,
        "step_cpu_s": step_cpu_s,
        "losses": [h["loss"] for h in logs],
        "logs": logs,
        "completion_tokens": sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
