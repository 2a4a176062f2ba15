"""The training loop, top to bottom: setup -> reference log-probs -> loop -> eval -> checkpoint
-> final save. One function, :func:`train`, so a reader can follow a run in order.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch

from fastpref.losses import RewardScores, get_loss
from fastpref.models import (
    PolicyLogps,
    RewardScorer,
    build_or_load_causal_lm,
    build_or_load_reward_model,
    check_model_path,
    load_tokenizer,
    model_identity,
)
from fastpref.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastpref.train.config import LOSS_HPARAMS, ConfigError, TrainConfig
from fastpref.train.engine import (
    ClippedAdamW,
    deepspeed_config,
    init_distributed,
    make_engine,
    sparse_embedding_gradients,
)
from fastpref.train.evaluate import evaluate, mismatched_completions
from fastpref.train.reference import (
    cache_key,
    compute_reference_table,
    default_cache_dir,
    load_or_compute,
)
from fastpref.train.runlog import RunLog, plot_curves
from fastpref.train.step import Task, batch_to_device, micro_step

__all__ = ["train", "loss_hparams", "default_lr"]

BUILT_MODEL_LR = 2e-3  # the bundled tiny Llama trains from scratch: a large step is right
EMBEDDED_STEPS = 60  # bundled model and data: enough for >= 0.9 held-out accuracy in minutes


def loss_hparams(cfg: TrainConfig, spec) -> dict[str, object]:
    """The hyperparameter flags that were set, checked against the loss's signature."""
    accepted = spec.hparams()
    given = {n: getattr(cfg, n) for n in LOSS_HPARAMS if getattr(cfg, n) is not None}
    for name in given:
        if name not in accepted:
            takes = ", ".join(f"--{k.replace('_', '-')}" for k in accepted) or "none"
            raise ConfigError(
                f"--{name.replace('_', '-')} is not a hyperparameter of {spec.name} "
                f"(it takes: {takes})"
            )
    return given


def default_lr(cfg: TrainConfig, spec) -> float:
    if cfg.lr is not None:
        return cfg.lr
    if cfg.model is None:
        return BUILT_MODEL_LR
    return 1e-5 if spec.name in ("sft", "rm") else 5e-7


def _check_inputs(cfg: TrainConfig, spec) -> None:
    """Every error that needs no model or data, before anything heavy starts."""
    check_model_path(cfg.model, "model")
    check_model_path(cfg.tokenizer, "tokenizer")
    if spec.needs_reference and cfg.ref_model is not None and cfg.ref_model.lower() == "none":
        raise ConfigError(
            f"--loss {spec.name} needs a reference model but --ref-model is 'none': "
            "pass --ref-model PATH, or leave it unset to use the initial policy"
        )
    if cfg.ref_model is not None and cfg.ref_model.lower() != "none":
        check_model_path(cfg.ref_model, "ref-model")
    for flag, path in (
        ("data", cfg.data),
        ("eval-split", cfg.eval_split),
        ("deepspeed", cfg.deepspeed),
    ):
        # a hub dataset name ("org/name") is left to `datasets`; anything file-like must exist
        file_like = (
            flag == "deepspeed"
            or path is not None
            and (
                path.startswith(("/", ".", "~"))
                or Path(path).suffix in {".jsonl", ".json", ".csv", ".parquet"}
            )
        )
        if path is not None and file_like and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"--{flag}: {path!r} does not exist")
    if cfg.resume and cfg.output_dir is None:
        raise ConfigError("--resume needs --output-dir (the run to continue)")
    if not 0.0 < cfg.eval_fraction < 1.0 and cfg.eval_split is None:
        raise ConfigError(f"--eval-fraction must be in (0, 1), got {cfg.eval_fraction}")
    if cfg.micro_batch < 1 or cfg.grad_accum < 1:
        raise ConfigError("--micro-batch and --grad-accum must be >= 1")


def _total_steps(cfg: TrainConfig, n_train: int, global_batch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.epochs is None and cfg.data is None and cfg.model is None:
        return EMBEDDED_STEPS
    return max(1, math.ceil((cfg.epochs or 1.0) * n_train / global_batch))


def _stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count`` of an endless stream of per-epoch permutations."""
    out, perms = [], {}
    for k in range(start, start + count):
        epoch = k // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(
                n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
            )
        out.append(int(perms[epoch][k % n]))
    return out


def _reduce_mean(
    values: dict[str, list[torch.Tensor]], tokens: torch.Tensor, world_size: int
) -> tuple[dict[str, float], float]:
    """NaN-aware mean of each metric over micro-steps and ranks, and the total token count:
    one all-reduce and one host sync per step (metrics stay on the device until here)."""
    keys = sorted(values)
    stacked = torch.stack([torch.stack([v.float() for v in values[k]]) for k in keys])  # [K, M]
    finite = torch.isfinite(stacked)
    sums = torch.stack([torch.where(finite, stacked, 0.0).sum(1), finite.sum(1).float()], 1)
    packed = torch.cat([sums.double().flatten(), tokens.double().view(1)])
    if world_size > 1:
        torch.distributed.all_reduce(packed)
    *flat, total_tokens = packed.tolist()
    means = {
        k: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else float("nan")
        for i, k in enumerate(keys)
    }
    return means, total_tokens


def _grad_norm_now(engine) -> float | None:
    grads = [
        p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None
    ]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the summary also written to ``<output_dir>/summary.json``."""
    t_start = time.perf_counter()
    # ---------------------------------------------------------------- setup: objective and checks
    spec = get_loss(cfg.loss)
    hparams = loss_hparams(cfg, spec)
    _check_inputs(cfg, spec)
    from fastpref.data import default_data, load_rows, split_rows, tokenize_rows

    fmt = spec.data_format
    data_source = cfg.data or str(default_data(fmt))
    rows = load_rows(data_source, fmt, columns=cfg.columns)  # DataError names file, row and field
    if cfg.eval_split is not None:
        train_rows, eval_rows = rows, load_rows(cfg.eval_split, fmt, columns=cfg.columns)
    else:
        train_rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    if not train_rows or not eval_rows:
        raise ConfigError(
            f"{data_source}: {len(train_rows)} training and {len(eval_rows)} held-out "
            "rows; both splits need at least one"
        )

    rank, world_size = init_distributed()
    is_main = rank == 0
    ds_config = deepspeed_config(cfg, world_size)  # a --deepspeed file's own values win
    cfg = dataclasses.replace(
        cfg,
        micro_batch=int(ds_config["train_micro_batch_size_per_gpu"]),
        grad_accum=int(ds_config["gradient_accumulation_steps"]),
        zero_stage=int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        bf16=bool(ds_config.get("bf16", {}).get("enabled", False)),
    )
    out_dir = [cfg.output_dir or f"runs/{cfg.loss}-{datetime.now():%Y%m%d-%H%M%S}"]
    if world_size > 1:  # one directory for all ranks, whatever each clock says
        torch.distributed.broadcast_object_list(out_dir, src=0)
    out_dir = Path(out_dir[0])
    ckpt_dir = out_dir / "checkpoints"
    resume_tag = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if not cfg.resume and latest_checkpoint(ckpt_dir) is not None:
        raise ConfigError(
            f"{out_dir} already holds checkpoints: pass --resume to continue that run, "
            "or choose another --output-dir (nothing is overwritten)"
        )
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed + rank)
    say = print if is_main else (lambda *a, **k: None)

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    pad_id = tokenizer.pad_token_id
    train_ex = tokenize_rows(
        train_rows, fmt, tokenizer, max_length=cfg.max_length, source=data_source
    )
    eval_ex = tokenize_rows(
        eval_rows, fmt, tokenizer, max_length=cfg.max_length, source=cfg.eval_split or data_source
    )
    mismatched = mismatched_completions(eval_ex, fmt, pad_id) if spec.name == "sft" else None

    # ---------------------------------------------------------------- model(s)
    dtype = torch.bfloat16 if cfg.bf16 else None
    common = dict(
        vocab_size=len(tokenizer),
        seed=cfg.seed,
        attn=cfg.attn_implementation,
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
    )
    if spec.inputs is RewardScores:
        model = build_or_load_reward_model(cfg.model, pad_token_id=pad_id, **common)
        scorer = RewardScorer(model)
    else:
        model = build_or_load_causal_lm(cfg.model, **common)
        scorer = PolicyLogps(model, zero_stage=cfg.zero_stage)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab}: "
            "pass the model's own --tokenizer"
        )
    task = Task(spec=spec, hparams=hparams, fmt=fmt, pad_id=pad_id)
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())

    # ---------------------------------------------------------------- reference log-probs
    ref_hit = None
    if spec.needs_reference:
        if cfg.ref_model is None:  # the reference is the initial policy
            ref_lm, ref_path = (copy.deepcopy(model) if cfg.ref_in_pass else model), cfg.model
        else:
            ref_lm, ref_path = build_or_load_causal_lm(cfg.ref_model, **common), cfg.ref_model
        ref_scorer = PolicyLogps(ref_lm).to(device)
        if cfg.ref_in_pass:
            task.ref_model = ref_scorer.eval().requires_grad_(False)
        else:
            identity = model_identity(ref_path, ref_lm)
            settings = {
                "dtype": str(dtype),
                "softcap": getattr(ref_lm.config, "final_logit_softcapping", None),
            }
            for split, examples in (("train", train_ex), ("eval", eval_ex)):
                key = cache_key(identity, fmt, examples, settings)
                table, ref_hit = load_or_compute(
                    Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
                    key,
                    lambda ex=examples: compute_reference_table(
                        ref_scorer,
                        ex,
                        fmt,
                        pad_id,
                        batch_size=2 * cfg.micro_batch,
                        device=device,
                        rank=rank,
                        world_size=world_size,
                    ),
                    rank=rank,
                    world_size=world_size,
                )
                task.ref_tables[split] = table
            say(
                "reference log-probs: "
                + ("loaded from cache" if ref_hit else "precomputed and cached")
            )
            del ref_scorer, ref_lm

    # ---------------------------------------------------------------- engine and schedule
    global_batch = cfg.micro_batch * cfg.grad_accum * world_size
    total_steps = _total_steps(cfg, len(train_ex), global_batch)
    eval_every = cfg.eval_every or max(1, total_steps // 5)
    lr = default_lr(cfg, spec)
    engine, scheduler = make_engine(scorer, ds_config, cfg, lr, total_steps)
    sparse_embedding_gradients(model, engine)
    # ZeRO and ClippedAdamW report the global norm; otherwise it is read before the step
    norm_before_step = cfg.zero_stage == 0 and not isinstance(engine.optimizer, ClippedAdamW)
    task.ref_tables = {split: t.to(engine.device) for split, t in task.ref_tables.items()}
    start_step = 0
    data_order = [global_batch, cfg.seed, len(train_ex)]  # what fixes the batch of every step
    if resume_tag is not None:
        client = load_checkpoint(engine, ckpt_dir, resume_tag, rank)
        start_step = client["step"]
        if client.get("data_order") != data_order:  # another batch or seed: not the same run
            raise ConfigError(
                f"--resume: {ckpt_dir / resume_tag} was written with (global batch, seed, train "
                f"examples) = {client.get('data_order')}, this run has {data_order}"
            )
        say(f"resumed from {ckpt_dir / resume_tag} at step {start_step}")
    elif cfg.resume:
        say(f"--resume: no complete checkpoint in {ckpt_dir}, starting from step 0")
    log = RunLog(
        out_dir,
        enabled=is_main,
        tensorboard=cfg.tensorboard,
        resume_step=start_step if cfg.resume else None,
    )
    eval_kw = dict(
        batch_size=2 * cfg.micro_batch, device=engine.device, rank=rank, world_size=world_size
    )

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(task, engine, eval_ex, mismatched, **eval_kw)
        log.write({"step": step, **result})
        return result

    say(
        f"fastpref-train: loss={spec.name} format={fmt} train={len(train_ex)} eval={len(eval_ex)} "
        f"steps={total_steps} global_batch={global_batch} lr={lr:g} world={world_size} "
        f"device={engine.device} out={out_dir}"
    )
    before = run_eval(start_step) if start_step == 0 else None
    if before is not None:
        say(
            f"held-out preference accuracy before training: {before['eval/accuracy']:.3f} "
            f"(eval loss {before['eval/loss']:.4f})"
        )

    # ---------------------------------------------------------------- loop
    from tqdm.auto import tqdm

    from fastpref.data import collate

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=not (is_main and cfg.progress),
        dynamic_ncols=True,
        desc=spec.name,
    )
    engine.train()
    after = None
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        values: dict[str, list[torch.Tensor]] = {}
        tokens = torch.zeros((), device=engine.device)
        pre_norm = None
        step_lr = scheduler.get_last_lr()[0] if scheduler is not None else lr  # used by this step
        for micro in range(cfg.grad_accum):
            first = step * global_batch + (micro * world_size + rank) * cfg.micro_batch
            idx = _stream_indices(len(train_ex), cfg.seed, first, cfg.micro_batch)
            batch = batch_to_device(collate([train_ex[i] for i in idx], fmt, pad_id), engine.device)
            loss, metrics, _, tok, _ = micro_step(task, engine, batch, "train")
            engine.backward(loss)
            if micro == cfg.grad_accum - 1 and norm_before_step:
                pre_norm = _grad_norm_now(engine)
            engine.step()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                values.setdefault(k, []).append(v)
            tokens = tokens + tok.sum()
        grad_norm = engine.get_global_grad_norm()  # ClippedAdamW's, or ZeRO's
        means, tokens = _reduce_mean(values, tokens, world_size)
        record = {"step": step + 1, **means}
        elapsed = time.perf_counter() - t0
        record.update(
            {
                "epoch": (step + 1) * global_batch / len(train_ex),
                "grad_norm": float(grad_norm)
                if grad_norm is not None
                else (pre_norm or float("nan")),
                "lr": step_lr,
                "tokens": tokens,
                "tokens/s": tokens / elapsed,
            }
        )
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            log.write(record)
        bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            acc=f"{record.get('rewards/accuracies', float('nan')):.2f}",
        )
        bar.update(1)
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            after = run_eval(step + 1)
            if is_main:
                bar.write(
                    f"step {step + 1}: eval loss {after['eval/loss']:.4f}, "
                    f"held-out accuracy {after['eval/accuracy']:.3f}"
                )
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(
                engine,
                ckpt_dir,
                step + 1,
                {"step": step + 1, "data_order": data_order},
                keep=cfg.save_total_limit,
                rank=rank,
            )
    bar.close()
    if after is None:  # resumed at the very end
        after = run_eval(total_steps)

    # ---------------------------------------------------------------- final save
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        # Training is over: the moments (2x the model) go before saving reads every weight and
        # the plot loads matplotlib, so the run's last acts do not set its peak memory.
        engine.optimizer.state.clear()
    final_dir = out_dir / "model"
    hf_model = engine.module.model
    if cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        if is_main:
            state = {k.removeprefix("model."): v for k, v in state.items()}
            hf_model.save_pretrained(final_dir, state_dict=state)
    elif is_main:
        hf_model.save_pretrained(final_dir)
    if is_main:
        tokenizer.save_pretrained(final_dir)
    summary = {
        "loss": spec.name,
        "steps": total_steps,
        "output_dir": str(out_dir),
        "accuracy_before": before["eval/accuracy"] if before else None,
        "accuracy_after": after["eval/accuracy"],
        "eval_loss_after": after["eval/loss"],
        "reference_cache_hit": ref_hit,
        "wall_s": time.perf_counter() - t_start,
    }
    if is_main:
        plot_curves(log.records(), out_dir / "curves.png", f"fastpref-train --loss {spec.name}")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if before is not None:
            print(
                "held-out preference accuracy: "
                f"{before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}"
            )
        else:
            print(f"held-out preference accuracy after training: {after['eval/accuracy']:.3f}")
        print(f"saved {final_dir} ({time.perf_counter() - t_start:.0f} s)")
    log.close()
    return summary
