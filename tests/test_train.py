"""fastpref-train end to end, in this process, on a tiny Llama (D=32, 2 layers) and 48-row slices
of the bundled datasets: every loss in scope, the DPO family's ln 2 start, accumulation
equivalence, the reference-log-prob cache, outputs, config precedence and bad input.

The model is tiny and max_length 64 so a run is a few seconds on a shared 2-core CPU; the trainer
code paths are the same as for a real model. Multi-process and kill/resume runs live in
test_train_distributed.py (they need fresh processes).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastpref.cli.train import main
from fastpref.families import FAMILIES
from fastpref.families import OBJECTIVES as LOSSES
from fastpref.families.lm_formats import FORMATS as LM_FORMATS
from fastpref.families.lm_formats import default_data
from fastpref.train import ConfigError, build_parser, parse_config, train
from fastpref.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("own_process_group")

FORMATS = {spec.fmt for spec in LOSSES.values()}


def _args(assets, tmp_path, loss, *extra, steps=4):
    fmt = LOSSES[loss].fmt
    return [
        "--loss",
        loss,
        "--model",
        str(assets / "model"),
        "--data",
        str(assets / f"{fmt}.jsonl"),
        "--max-length",
        "64",
        "--micro-batch",
        "4",
        "--max-steps",
        str(steps),
        "--lr",
        "5e-3",
        "--eval-fraction",
        "0.25",
        "--eval-every",
        "100",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(tmp_path / loss),
        *extra,
    ]


def _run(argv):
    summary = train(parse_config(argv))
    records = [
        json.loads(line) for line in open(os.path.join(summary["output_dir"], "metrics.jsonl"))
    ]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    return summary, steps, evals


# Step-0 loss when policy = reference (log-ratios 0), β = 0.1: −log σ(0) = ln 2 for dpo and its
# label-smoothed variants (cdpo: −(1−ε)log σ(0) − ε log σ(0); robust divides the same by 1−2ε
# after the −ε term flips sign: ((1−ε) − ε)·ln 2/(1−2ε)); hinge: max(0, 1 − 0) = 1;
# ipo: (0 − 1/(2β))² = 25.
START = {"dpo": math.log(2), "cdpo": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": 25.0}


def spec_needs_reference(loss: str) -> bool:
    return LOSSES[loss].needs_reference


# the losses on the formats whose 48-row slices conftest's `assets` writes; the other families
# (e.g. rankllm, whose prompts take --context-size, not --max-length) train end to end in their
# own test files
@pytest.mark.slow
@pytest.mark.parametrize("loss", [n for n, o in LOSSES.items() if o.fmt in LM_FORMATS])
def test_every_loss_trains_end_to_end(assets, tmp_path, loss):
    summary, steps, evals = _run(_args(assets, tmp_path, loss, steps=2))
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    before, after = evals[0], evals[-1]
    assert after["eval/loss"] < before["eval/loss"], (before, after)  # the same held-out rows
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    if loss in START:
        assert before["eval/loss"] == pytest.approx(START[loss], rel=1e-4)
        assert steps[0]["loss"] == pytest.approx(START[loss], rel=1e-4)  # no update before step 1
    if spec_needs_reference(loss):  # policy = reference: identical rewards, every pair a tie
        assert before["eval/accuracy"] == 0.5
    assert (assets / "model").exists() and (
        tmp_path / loss / "model" / "model.safetensors"
    ).exists()


def test_outputs_metrics_curves_and_model(assets, tmp_path):
    summary, steps, evals = _run(_args(assets, tmp_path, "dpo", "--tensorboard"))
    out = tmp_path / "dpo"
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "lr",
        "tokens/s",
    ):
        assert key in steps[-1], key
    assert steps[0]["lr"] > 0 and steps[-1]["lr"] < max(r["lr"] for r in steps)  # warmup then decay
    assert {"eval/loss", "eval/accuracy", "eval/rewards/margins"} <= set(evals[-1])
    assert (out / "curves.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    AutoTokenizer.from_pretrained(out / "model")
    initial = load_file(assets / "model" / "model.safetensors")
    assert not torch.equal(model.lm_head.weight, initial["lm_head.weight"])  # it trained
    assert (
        json.loads((out / "summary.json").read_text())["accuracy_after"]
        == summary["accuracy_after"]
    )


@pytest.mark.slow
def test_grad_accumulation_equals_one_large_batch(assets, tmp_path):
    base = _args(assets, tmp_path, "dpo", steps=2)
    one = base + ["--micro-batch", "4", "--grad-accum", "1", "--output-dir", str(tmp_path / "a")]
    acc = base + ["--micro-batch", "2", "--grad-accum", "2", "--output-dir", str(tmp_path / "b")]
    _, big, _ = _run(one)
    _, small, _ = _run(acc)
    for r1, r2 in zip(big, small, strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4, abs=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-3)
    w1 = load_file(tmp_path / "a" / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "b" / "model" / "model.safetensors")
    # AdamW moves each weight by up to ~lr (5e-3) a step whatever its gradient's size, so an
    # element whose gradient is at rounding level, where the two batchings round differently,
    # may move by a visible fraction of lr: weights agree to 1% of one step. (A lost or doubled
    # micro-batch changes directions by O(lr); its gradient norm is checked above.)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-2 * 5e-3)


@pytest.mark.slow
def test_reference_cache_is_hit_and_matches_in_pass_reference(assets, tmp_path):
    def _a2(*extra):
        return _args(assets, tmp_path, "dpo", *extra, steps=2)

    first, steps1, _ = _run(_a2("--output-dir", str(tmp_path / "1")))
    second, steps2, _ = _run(_a2("--output-dir", str(tmp_path / "2")))
    assert first["reference_cache_hit"] is False and second["reference_cache_hit"] is True
    assert [r["loss"] for r in steps1] == [r["loss"] for r in steps2]
    in_pass, steps3, _ = _run(_a2("--ref-in-pass", "--output-dir", str(tmp_path / "3")))
    assert in_pass["reference_cache_hit"] is None
    for a, b in zip(steps1, steps3, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    # other data -> another key: a miss, never a stale table
    third, _, _ = _run(_a2("--max-length", "24", "--output-dir", str(tmp_path / "4")))
    assert third["reference_cache_hit"] is False


@pytest.mark.parametrize(
    "options",
    [["--bf16"], ["--zero-stage", "2", "--offload"], ["--deepspeed", "DS_JSON"]],
    ids=["bf16", "zero2-offload", "ds-json"],
)
def test_deepspeed_options_and_eval_split(assets, tmp_path, options):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": 2,
                "gradient_clipping": "auto",
                "zero_optimization": {"stage": 1},
            }
        )
    )
    options = [str(ds) if o == "DS_JSON" else o for o in options]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join((assets / "pair.jsonl").read_text().splitlines()[:8]) + "\n")
    summary, steps, evals = _run(
        _args(assets, tmp_path, "simpo", "--eval-split", str(held_out), *options, steps=2)
    )
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert evals[-1]["eval/accuracy"] * 8 == pytest.approx(round(evals[-1]["eval/accuracy"] * 8))
    config = json.loads((tmp_path / "simpo" / "config.json").read_text())
    if "--deepspeed" in options:  # the file's values drive the loop and are what config.json shows
        assert (config["grad_accum"], config["micro_batch"], config["zero_stage"]) == (2, 4, 1)
    assert summary["steps"] == 2


def test_reference_free_loss_loads_no_reference(assets, tmp_path, monkeypatch):
    import fastpref.train.reference as reference

    calls = []
    monkeypatch.setattr(reference, "compute_reference_table", lambda *a, **k: calls.append(1))
    summary, _, _ = _run(_args(assets, tmp_path, "orpo", steps=1))
    assert calls == [] and summary["reference_cache_hit"] is None


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: dpo\nmicro-batch: 3\nlr: 0.1\nbeta: 0.5\ncolumns: {prompt: question}\n")
    cfg = parse_config(["--config", str(path), "--lr", "0.01"])
    assert (cfg.loss, cfg.micro_batch, cfg.lr, cfg.beta) == ("dpo", 3, 0.01, 0.5)
    assert cfg.columns == {"prompt": "question"}
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"zero_stage": 2, "bf16": True}))
    cfg = parse_config(["--config", str(json_path), "--columns", "chosen=good,rejected=bad"])
    assert (cfg.zero_stage, cfg.bf16, cfg.columns) == (
        2,
        True,
        {"chosen": "good", "rejected": "bad"},
    )


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, f in TrainConfig.__dataclass_fields__.items():
        assert "--" + name.rstrip("_").replace("_", "-") in text
        assert f"(default: {f.default})" in text
    for family in FAMILIES:  # grouped by family, every --loss listed once
        assert f"{family.name} ({family.summary}): " + ", ".join(
            o.name for o in family.objectives
        ) in " ".join(text.split())


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_is_reported_before_training(assets, tmp_path, capsys):
    base = _args(assets, tmp_path, "dpo")
    assert "choose one of" in _cli_error(capsys, ["--loss", "nope"])
    assert "does not exist" in _cli_error(capsys, base + ["--model", str(tmp_path / "missing")])
    assert "does not exist" in _cli_error(
        capsys, base + ["--data", str(tmp_path / "missing.jsonl")]
    )
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: [unclosed\n")
    assert "not valid YAML" in _cli_error(capsys, ["--config", str(bad_yaml)])
    assert "cannot read" in _cli_error(capsys, ["--config", str(tmp_path / "none.yaml")])
    (tmp_path / "typo.yaml").write_text("learning_rate: 0.1\n")
    assert "unknown option 'learning_rate'" in _cli_error(
        capsys, ["--config", str(tmp_path / "typo.yaml")]
    )
    assert "needs a reference model" in _cli_error(capsys, base + ["--ref-model", "none"])
    assert "not a hyperparameter of dpo" in _cli_error(capsys, base + ["--gamma", "1"])
    rows = (assets / "pair.jsonl").read_text().splitlines()
    row = json.loads(rows[2])
    del row["rejected"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(rows[:2] + [json.dumps(row)] + rows[3:]) + "\n")
    err = _cli_error(capsys, base + ["--data", str(broken)])
    assert "broken.jsonl" in err and "rejected" in err and "3" in err, err
    assert not (tmp_path / "dpo").exists()  # nothing ran


def test_existing_checkpoints_are_never_overwritten(assets, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _args(assets, tmp_path, "orpo", "--save-every", "1", "--output-dir", str(out), steps=2)
    _run(argv)
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == "step_000002" and (out / "checkpoints" / latest).is_dir()
    assert "already holds checkpoints" in _cli_error(capsys, argv)
    assert (out / "checkpoints" / "latest").read_text() == latest
    other_batch = argv + ["--resume", "--micro-batch", "2"]
    assert "written with (global batch, seed, train examples) = [4, 0, 36]" in _cli_error(
        capsys, other_batch
    )
    assert (out / "checkpoints" / latest).is_dir()
    with pytest.raises(ConfigError, match="needs --output-dir"):
        train(TrainConfig(resume=True))


def test_preference_accuracy_definitions_by_hand():
    """Hand-worked accuracies: ties count ½; lipo counts ordered pairs; kto is an AUC."""
    from fastpref.families.lm_preference import accuracy_parts, kto_auc

    dpo = LOSSES["dpo"]
    values = torch.tensor([[-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0]])  # [R=2 (chosen, rejected), B=3]
    ref = torch.zeros(2, 3)
    # rewards chosen − rejected = 1, 0, −2 -> 1 + ½ + 0 over 3 pairs
    assert accuracy_parts(dpo, {}, values, torch.ones(2, 3), ref)[:2] == (1.5, 3.0)
    simpo = LOSSES["simpo"]
    tokens = torch.tensor([[1.0, 4.0, 1.0], [4.0, 1.0, 1.0]])
    # token means: chosen −1, −0.5, −3 vs rejected −0.5, −2, −1 -> 0 + 1 + 0
    assert accuracy_parts(simpo, {}, values, tokens, None)[:2] == (1.0, 3.0)
    lipo = LOSSES["lipo"]
    batch = {"scores": torch.tensor([[2.0, 1.0, 0.0]]), "list_mask": torch.tensor([[True] * 3])}
    # rewards 0, 1, −1 for scores 2, 1, 0: pairs (0,1) wrong, (0,2) right, (1,2) right
    logps = torch.tensor([[0.0], [1.0], [-1.0]])
    assert accuracy_parts(lipo, batch, logps, torch.ones(3, 1), torch.zeros(3, 1))[:2] == (2.0, 3.0)
    batch["list_mask"] = torch.tensor([[True, True, False]])  # padding never counts
    assert accuracy_parts(lipo, batch, logps, torch.ones(3, 1), torch.zeros(3, 1))[:2] == (0.0, 1.0)
    # kto: desirable rewards {2, 0}, undesirable {1, 0}: pairs 2>1, 2>0, 0<1, 0=0 -> 2.5 / 4
    assert kto_auc([(2.0, True), (0.0, True), (1.0, False), (0.0, False)]) == 0.625


def test_sft_accuracy_scores_each_completion_after_another_prompt():
    from fastpref.families.lm_formats import collate, load_rows, tokenize_rows
    from fastpref.families.lm_preference import collate_sequences as _collate_sequences
    from fastpref.families.lm_preference import mismatched_completions
    from fastpref.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    rows = load_rows(str(default_data("sft")), "sft")[:3]
    examples = tokenize_rows(rows, "sft", tokenizer, max_length=64)
    pad = tokenizer.pad_token_id
    mixed = _collate_sequences(mismatched_completions(examples, "sft", pad), pad)
    own = collate(examples, "sft", pad)

    def completion(batch, b):  # the labelled tokens of row b
        return batch["labels"][b][batch["labels"][b] != -100].tolist()

    def prompt(batch, b):  # tokens before the first labelled position's target
        first = int((batch["labels"][b] != -100).nonzero()[0])
        return batch["input_ids"][b][: first + 1].tolist()

    for i in range(3):
        assert completion(mixed, i) == completion(own, i)  # the same completion...
        assert prompt(mixed, i) == prompt(own, (i + 1) % 3)  # ...after the next prompt
        n = int(mixed["attention_mask"][i].sum())
        ids, labels = mixed["input_ids"][i], mixed["labels"][i]
        assert torch.equal(
            labels[: n - 1][labels[: n - 1] != -100], ids[1:n][labels[: n - 1] != -100]
        )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.05, 1e6, 0.0])
def test_clipped_adamw_equals_clip_then_adamw(fused, max_norm):
    """ClippedAdamW = clip_grad_norm_ followed by AdamW: parameters, gradients and the norm."""
    from fastpref.train.engine import ClippedAdamW

    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    kw = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), fused=fused)
    ours = ClippedAdamW(a, max_grad_norm=max_norm, **kw)
    theirs = torch.optim.AdamW(b, **kw)
    for step in range(3):
        grads = [torch.randn(s) * (step + 1) for s in shapes]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(b, max_norm) if max_norm > 0 else None
        ours.step()
        theirs.step()
        if norm is not None:
            torch.testing.assert_close(ours._global_grad_norm, norm)
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not hasattr(ours, "grad_scale")  # nothing left behind for the next step


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("max_norm", [0.05, 0.0])
def test_clipped_adamw_bf16_steps_float32_masters(max_norm, chunk, monkeypatch):
    """A bf16 parameter steps like AdamW on a float32 copy fed the widened bf16 gradients, and
    is that copy rounded; the masters and moments survive a state_dict round trip in float32
    (torch would cast them to bf16), so a resumed run continues exactly. ``chunk=8``: the 35-
    element parameter is stepped in chunks of 8 (the last one 3), the 5-element one whole."""
    from fastpref.train.engine import ClippedAdamW

    if chunk is not None:
        monkeypatch.setattr(ClippedAdamW, "MASTER_CHUNK", chunk)
    torch.manual_seed(0)
    shapes = [(7, 5), (5,)]
    low = [torch.randn(s).bfloat16().requires_grad_(True) for s in shapes]
    master = [p.detach().float().requires_grad_(True) for p in low]
    kw = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    ours = ClippedAdamW(low, max_grad_norm=max_norm, **kw)
    theirs = torch.optim.AdamW(master, **kw)
    for step in range(4):
        if step == 2:  # a resume: a fresh optimizer over the same parameters, state reloaded
            saved = ours.state_dict()
            ours = ClippedAdamW(low, max_grad_norm=max_norm, **kw)
            ours.load_state_dict(saved)
            assert ours.state[low[0]]["master"].dtype == torch.float32
            assert ours.state[low[0]]["exp_avg_sq"].dtype == torch.float32
        grads = [torch.randn(s).bfloat16() * (step + 1) for s in shapes]
        for p, q, g in zip(low, master, grads, strict=True):
            p.grad, q.grad = g.clone(), g.float()
        norm = torch.nn.utils.clip_grad_norm_(master, max_norm) if max_norm > 0 else None
        ours.step()
        theirs.step()
        if norm is not None:
            torch.testing.assert_close(ours._global_grad_norm, norm)
        for p, q in zip(low, master, strict=True):
            assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
            torch.testing.assert_close(ours.state[p]["master"], q.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(p.detach(), q.detach().bfloat16())


def test_clipped_adamw_norms_when_every_gradient_is_chunked(monkeypatch):
    """Only large bf16 gradients (none left for ``_foreach_norm``): the chunked norm alone is
    the global norm ``clip_grad_norm_`` gives on a float32 copy."""
    from fastpref.train.engine import ClippedAdamW

    monkeypatch.setattr(ClippedAdamW, "MASTER_CHUNK", 8)
    torch.manual_seed(0)
    low = [torch.randn(7, 5).bfloat16().requires_grad_(True)]
    master = [low[0].detach().float().requires_grad_(True)]
    ours = ClippedAdamW(low, max_grad_norm=0.05, lr=1e-2, fused=True)
    low[0].grad = torch.randn(7, 5).bfloat16()
    master[0].grad = low[0].grad.float()
    norm = torch.nn.utils.clip_grad_norm_(master, 0.05)
    ours.step()
    torch.testing.assert_close(ours._global_grad_norm, norm)


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clipped_adamw_sparse_rows_equal_the_dense_update(max_norm, weight_decay, monkeypatch):
    """A row-sparse embedding gradient gets exactly the dense AdamW update, block by block.

    Rows 9-10 (the last block) first get a gradient at step 2, and without weight decay a block
    is skipped until then; the state is saved and reloaded halfway (which forgets which blocks
    were skipped), and every step must still equal dense AdamW's.
    """
    from fastpref.train.engine import ClippedAdamW

    monkeypatch.setattr(ClippedAdamW, "SPARSE_BLOCK", 3 * 4)  # 3 rows a block: several blocks
    torch.manual_seed(0)
    sparse_emb = torch.nn.Embedding(11, 4, sparse=True)
    dense_emb = torch.nn.Embedding(11, 4)
    dense_emb.load_state_dict(sparse_emb.state_dict())
    lin_a, lin_b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    lin_b.load_state_dict(lin_a.state_dict())
    kw = dict(lr=1e-2, weight_decay=weight_decay, betas=(0.9, 0.95), fused=True)
    ours = ClippedAdamW(
        [*sparse_emb.parameters(), *lin_a.parameters()], max_grad_norm=max_norm, **kw
    )
    theirs = torch.optim.AdamW([*dense_emb.parameters(), *lin_b.parameters()], **kw)
    for step in range(4):
        high = 11 if step >= 2 else 9
        ids = torch.randint(0, high, (2, 5), generator=torch.Generator().manual_seed(step))
        ids[0, :2] = 7  # a repeated row: its contributions are summed
        ids[1, 0] = 10 if step >= 2 else 0
        if step == 3:
            ours.load_state_dict(ours.state_dict())
        for emb, lin in ((sparse_emb, lin_a), (dense_emb, lin_b)):
            (lin(emb(ids)) ** 2).sum().mul(step + 1).backward()
        assert sparse_emb.weight.grad.is_sparse
        norm = torch.nn.utils.clip_grad_norm_(
            [*dense_emb.parameters(), *lin_b.parameters()], max_norm
        )
        ours.step()
        theirs.step()
        torch.testing.assert_close(ours._global_grad_norm, norm)
        for a, b in ((sparse_emb.weight, dense_emb.weight), (lin_a.weight, lin_b.weight)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(ours.state[a][key], theirs.state[b][key])
        ours.zero_grad()
        theirs.zero_grad()


def test_bf16_zero0_engine_keeps_fp32_masters_and_buffers(assets):
    """--bf16 under ZeRO-0: ClippedAdamW is the optimizer (no DeepSpeed bf16 wrapper), with
    clipping moved into it; a float32 parameter is cast to bf16, buffers (RoPE's inv_freq) stay
    float32, and after a step every parameter is its float32 master rounded."""
    from fastpref.train.engine import (
        ClippedAdamW,
        deepspeed_config,
        init_distributed,
        make_engine,
    )

    init_distributed()
    model = AutoModelForCausalLM.from_pretrained(str(assets / "model"), dtype=torch.bfloat16)
    model.lm_head.weight.data = model.lm_head.weight.data.float()  # one left in float32
    cfg = TrainConfig(loss="simpo", bf16=True, max_grad_norm=1.0)
    engine, _ = make_engine(model, deepspeed_config(cfg, 1), cfg, 1e-3, total_steps=2)
    opt = engine.optimizer
    assert type(opt) is ClippedAdamW and opt.max_grad_norm == 1.0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inv_freq = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    for p in model.parameters():
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32 and torch.equal(p.detach(), master.bfloat16())


def test_clipped_adamw_bf16_sparse_rows_equal_the_dense_bf16_update(monkeypatch):
    """A bf16 embedding with row-sparse gradients steps its float32 master block by block,
    exactly as the dense bf16 table steps its master (rows never repeat in a batch here, so
    both gradients are the same bf16 numbers), and the table is its master rounded."""
    from fastpref.train.engine import ClippedAdamW

    monkeypatch.setattr(ClippedAdamW, "SPARSE_BLOCK", 3 * 4)  # 3 rows a block
    torch.manual_seed(0)
    sparse_emb = torch.nn.Embedding(11, 4, sparse=True).bfloat16()
    dense_emb = torch.nn.Embedding(11, 4).bfloat16()
    dense_emb.load_state_dict(sparse_emb.state_dict())
    kw = dict(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), fused=True)
    ours = ClippedAdamW(sparse_emb.parameters(), max_grad_norm=0.5, **kw)
    theirs = ClippedAdamW(dense_emb.parameters(), max_grad_norm=0.5, **kw)
    for step in range(4):
        ids = torch.randperm(11, generator=torch.Generator().manual_seed(step))[:5]
        for emb in (sparse_emb, dense_emb):
            emb(ids).float().pow(2).sum().mul(step + 1).backward()
        assert sparse_emb.weight.grad.is_sparse
        ours.step()
        theirs.step()
        a, b = sparse_emb.weight, dense_emb.weight
        torch.testing.assert_close(ours._global_grad_norm, theirs._global_grad_norm)
        for key in ("master", "exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(ours.state[a][key], theirs.state[b][key])
        assert torch.equal(a.detach(), ours.state[a]["master"].bfloat16())
        ours.zero_grad()
        theirs.zero_grad()


@pytest.mark.parametrize(
    ("weight_decay", "expected"), [(0.0, [0, 0, 3]), (0.01, [0, 1, 2, 3, 4] * 2)]
)
def test_clipped_adamw_skips_blocks_no_gradient_has_reached(weight_decay, expected, monkeypatch):
    """Without weight decay, a block of embedding rows that no batch has touched is not passed
    to the fused kernel (its update is exactly zero), and its moments stay exact zeros; with
    weight decay every block is updated. Steps touch rows {1, 2} (block 0), then {13, 2}
    (blocks 3 and 0)."""
    from fastpref.train.engine import ClippedAdamW

    monkeypatch.setattr(ClippedAdamW, "SPARSE_BLOCK", 4 * 3)  # 4 rows a block, 5 blocks
    emb = torch.nn.Embedding(20, 3, sparse=True)
    opt = ClippedAdamW(emb.parameters(), max_grad_norm=0.0, lr=1e-2, fused=True,
                       weight_decay=weight_decay)  # fmt: skip
    seen: list[int] = []
    fused = torch._fused_adamw_

    def spy(params, *args, **kw):
        seen.append((params[0].data_ptr() - emb.weight.data_ptr()) // (4 * 3 * 4))
        return fused(params, *args, **kw)

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    for ids in (torch.tensor([1, 2]), torch.tensor([13, 2])):
        emb(ids).sum().backward()
        opt.step()
        opt.zero_grad()
    assert seen == expected
    if weight_decay == 0.0:
        assert not opt.state[emb.weight]["exp_avg"][4:12].any()


def test_zero_pages_like_is_a_fresh_zero_tensor():
    from fastpref.train.engine import _zero_pages_like

    bf = torch.zeros(5, 7, dtype=torch.bfloat16)
    for p in (torch.ones(4, 3), bf, torch.ones(6, 2).t(), torch.ones(0, 3)):
        z, before = _zero_pages_like(p), p.clone()
        assert z.shape == p.shape and z.dtype == p.dtype and not z.any()
        z.add_(1)  # writable, and not aliasing p
        assert torch.equal(p, before) and bool((z == 1).all())


def test_reference_table_rounds_like_the_evaluation_forward():
    """The precompute scores every row of a batch, as evaluation does, so the reference values of
    a policy equal to its reference are bit-identical to the policy's (exact ties at step 0),
    even for rdpo, whose loss needs the reference of only the chosen and rejected rows (scoring
    those alone packs them differently, which rounds differently on the bundled model)."""
    from fastpref.families import family_of
    from fastpref.families.base import Dist
    from fastpref.families.lm_formats import collate, load_rows, tokenize_rows
    from fastpref.models import PolicyLogps, build_or_load_causal_lm, load_tokenizer
    from fastpref.train.reference import compute_reference_table

    task = family_of("rdpo").start(LOSSES["rdpo"], parse_config(["--loss", "rdpo"]), {})
    tok = load_tokenizer(None)
    model = build_or_load_causal_lm(None, vocab_size=len(tok), seed=0)
    rows = load_rows(str(default_data("pair_rationale")), "pair_rationale")[:32]
    examples = tokenize_rows(rows, "pair_rationale", tok, max_length=512)
    scorer = PolicyLogps(model).eval()
    table = compute_reference_table(
        task, scorer, examples, batch_size=16, dist=Dist(torch.device("cpu"))
    )
    for start in (0, 16):
        batch = collate(examples[start : start + 16], "pair_rationale", tok.pad_token_id)
        with torch.no_grad():
            values, _ = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        policy = values.view(3, 16)[:2].T  # [B, (chosen, rejected)]
        assert torch.equal(table[batch["example_ids"]], policy)
