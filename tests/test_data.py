"""fastpref.data and the LM family's formats: loading and validating rows, tokenisation,
collation, the bundled assets.

Small hand-written rows are used wherever an exact expected value is checked; the bundled
files are loaded whole once (they are small) to check that every format works out of the box.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from fastpref.data import DataError, split_rows
from fastpref.families.lm_formats import (
    FORMATS,
    RATIONALE_TEMPLATE,
    ROLES,
    collate,
    default_data,
    load_rows,
    tokenize_rows,
)
from fastpref.paths import bundled_model_config_path, bundled_tokenizer_path

ROWS = {
    "pair": [
        {"prompt": "Tell me about chess.", "chosen": "Sure! Pawns.", "rejected": "Go away."},
        {"prompt": "Tell me about soccer.", "chosen": "Of course! Goals.", "rejected": "Ugh."},
        {"prompt": "Hi?", "chosen": "Hello there, friend.", "rejected": "What?"},
    ],
    "pair_rationale": [
        {
            "prompt": "Tell me about chess.",
            "chosen": "Sure! Pawns.",
            "rejected": "Go away.",
            "rationale": "The rejected answer is rude.",
        },
        {
            "prompt": "Tell me about birds.",
            "chosen": "Gladly. Wings.",
            "rejected": "Fish!",
            "rationale": "The rejected answer drifts to fishing.",
        },
    ],
    "kto": [
        {"prompt": "Tell me about chess.", "completion": "Sure! Pawns.", "label": True},
        {"prompt": "Tell me about birds.", "completion": "Go away.", "label": False},
        {"prompt": "Tell me about rain.", "completion": "Clouds and wind.", "label": True},
    ],
    "list": [
        {
            "prompt": "Tell me about chess.",
            "responses": ["Sure! Pawns.", "Go away.", "Fish."],
            "scores": [2.0, 0.0, 1.0],
        },
        {"prompt": "Tell me about birds.", "responses": ["Wings.", "Ugh."], "scores": [1.0, 0.0]},
    ],
    "sft": [
        {"prompt": "Tell me about chess.", "completion": "Sure! Pawns and knights."},
        {"prompt": "Tell me about birds.", "completion": "Gladly. Wings and nests."},
    ],
}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(bundled_tokenizer_path())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:  # lists (responses, scores, chat messages) are JSON text in a cell
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


# --- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_bundled_data_loads(fmt):
    rows = load_rows(str(default_data(fmt)), fmt)
    assert 1000 <= len(rows) <= 3000
    fields = {
        "pair": {"prompt", "chosen", "rejected"},
        "pair_rationale": {"prompt", "chosen", "rejected", "rationale"},
        "kto": {"prompt", "completion", "label"},
        "list": {"prompt", "responses", "scores"},
        "sft": {"prompt", "completion"},
    }[fmt]
    assert all(set(r) == fields for r in rows)
    if fmt == "list":
        assert all(len(r["responses"]) == 4 and sorted(r["scores"]) == [0, 1, 2, 3] for r in rows)
    if fmt == "kto":
        share = sum(r["label"] for r in rows) / len(rows)
        assert 0.4 < share < 0.6


def test_bundled_data_is_small():
    """The LM formats' files stay under 2 MiB together, every family's data under 8 MiB."""
    lm_files = {default_data(fmt) for fmt in FORMATS}
    assert sum(p.stat().st_size for p in lm_files) < 2 * 1024 * 1024
    data_dir = default_data("sft").parent
    assert sum(p.stat().st_size for p in data_dir.iterdir()) < 8 * 1024 * 1024


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("writer", [write_jsonl, write_csv, write_parquet])
def test_local_files_load(tmp_path, fmt, writer):
    ext = {write_jsonl: "jsonl", write_csv: "csv", write_parquet: "parquet"}[writer]
    path = writer(tmp_path / f"rows.{ext}", ROWS[fmt])
    assert load_rows(str(path), fmt) == ROWS[fmt]


def test_csv_text_that_looks_like_json_stays_text(tmp_path):
    rows = [{"prompt": "[1, 2] or [3]?", "completion": "[1, 2]"}]
    assert load_rows(str(write_csv(tmp_path / "j.csv", rows)), "sft") == rows


def test_json_array_loads(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS["pair"]))
    assert load_rows(str(path), "pair") == ROWS["pair"]


def test_column_remap(tmp_path):
    renamed = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS["pair"]
    ]
    path = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert load_rows(str(path), "pair", columns=columns) == ROWS["pair"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "bad": "b"}])
    with pytest.raises(DataError) as e:
        load_rows(str(bad), "pair", columns=columns)
    assert str(e.value) == f"{bad}: line 1: field 'good' (chosen) is missing"


def test_margin_column_is_collated(tok, tmp_path):
    rows = [dict(r, margin=float(i)) for i, r in enumerate(ROWS["pair"])]
    loaded = load_rows(str(write_jsonl(tmp_path / "m.jsonl", rows)), "pair")
    batch = collate(tokenize_rows(loaded, "pair", tok, max_length=64), "pair", tok.pad_token_id)
    assert batch["margin"].tolist() == [0.0, 1.0, 2.0]
    plain = tokenize_rows(ROWS["pair"], "pair", tok, max_length=64)
    assert "margin" not in collate(plain, "pair", tok.pad_token_id)


# --- bad input --------------------------------------------------------------------------------


def test_missing_field_names_file_line_field(tmp_path):
    rows = [ROWS["pair"][0], ROWS["pair"][1], {"prompt": "p", "rejected": "r"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_rows(str(path), "pair")
    assert str(e.value) == f"{path}: line 3: field 'chosen' is missing"


def test_wrong_type_names_file_line_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    # a blank line still counts: the error names the line in the file, not the row index
    path.write_text(
        json.dumps(ROWS["kto"][0])
        + "\n\n"
        + json.dumps({"prompt": "p", "completion": "c", "label": "yes"})
        + "\n"
    )
    with pytest.raises(DataError) as e:
        load_rows(str(path), "kto")
    assert str(e.value) == (f"{path}: line 3: field 'label' must be true/false or 1/0, got 'yes'")


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        (
            {"prompt": 3, "completion": "c"},
            "sft",
            "field 'prompt' must be a string or a list of chat messages, got int",
        ),
        (
            {"prompt": "p", "chosen": "c", "rejected": "r", "rationale": 1},
            "pair_rationale",
            "field 'rationale' must be a string, got int",
        ),
        (
            {"prompt": "p", "responses": ["a", "b"], "scores": [1.0]},
            "list",
            "field 'scores' must be a list of 2 numbers (one per response), got a list of 1",
        ),
        (
            {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, "x"]},
            "list",
            "field 'scores' must hold numbers, got str",
        ),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
            "pair",
            "field 'chosen' given as chat messages must be one assistant message",
        ),
    ],
)
def test_wrong_types(tmp_path, row, fmt, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_rows(str(path), fmt)
    assert str(e.value) == f"{path}: line 1: {message}"


def test_bad_csv_and_parquet_rows_name_the_row(tmp_path):
    rows = [ROWS["sft"][0], {"prompt": "p", "completion": None}]
    for path in (
        write_csv(tmp_path / "bad.csv", rows),
        write_parquet(tmp_path / "bad.parquet", rows),
    ):
        with pytest.raises(DataError) as e:
            load_rows(str(path), "sft")
        assert str(e.value) == f"{path}: row 2: field 'completion' is missing"


def test_bad_json_line_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS["sft"][0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl: line 2: not valid JSON"):
        load_rows(str(path), "sft")
    with pytest.raises(DataError, match="file not found"):
        load_rows(str(tmp_path / "nope.jsonl"), "sft")
    with pytest.raises(DataError, match="not a file"):
        load_rows(str(tmp_path), "sft")
    with pytest.raises(ValueError, match="choose one of pair, pair_rationale, kto, list, sft"):
        load_rows(str(path), "pairs")


# --- tokenisation and collation ----------------------------------------------------------------


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_and_completion_tokenised_separately(tok):
    (ex,) = tokenize_rows(ROWS["sft"][:1], "sft", tok, max_length=128)
    row = ROWS["sft"][0]
    prompt = [tok.bos_token_id, *ids_of(tok, row["prompt"])]
    assert ex["input_ids"] == [prompt + ids_of(tok, row["completion"]) + [tok.eos_token_id]]
    assert ex["prompt_lengths"] == [len(prompt)]
    assert ex["example_id"] == 0


def test_truncation_cuts_prompt_start_and_keeps_completion(tok):
    row = {"prompt": " ".join(f"word{i}" for i in range(40)), "completion": "Sure! Pawns."}
    full_prompt = [tok.bos_token_id, *ids_of(tok, row["prompt"])]
    completion = ids_of(tok, row["completion"]) + [tok.eos_token_id]
    max_length = len(completion) + 6
    (ex,) = tokenize_rows([row], "sft", tok, max_length=max_length)
    (seq,) = ex["input_ids"]
    assert len(seq) == max_length
    # BOS stays, then the last 5 prompt tokens, then the whole completion with its EOS
    assert seq == [tok.bos_token_id, *full_prompt[-5:], *completion]
    assert ex["prompt_lengths"] == [6]
    # too short even for the whole completion: one prompt token stays, the completion's end goes
    (ex,) = tokenize_rows([row], "sft", tok, max_length=3)
    assert ex["input_ids"] == [[tok.bos_token_id, *completion[:2]]]


def test_empty_completions_dropped_with_one_warning(tok):
    rows = [
        {"prompt": "a", "completion": "fine"},
        {"prompt": "b", "completion": ""},
        {"prompt": "c", "completion": "also fine"},
        {"prompt": "d", "completion": ""},
    ]
    with pytest.warns(UserWarning) as record:
        examples = tokenize_rows(rows, "sft", tok, max_length=32, source="toy.jsonl")
    assert len(record) == 1
    assert str(record[0].message) == (
        "toy.jsonl: dropped 2 of 4 examples whose completion is empty after truncation "
        "to max_length=32"
    )
    assert [ex["example_id"] for ex in examples] == [0, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_rows(rows[:1], "sft", tok, max_length=32)


def check_labels(batch):
    """labels[:, t] == input_ids[:, t+1] exactly on completion tokens, -100 elsewhere."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    shifted = torch.full_like(ids, -100)
    shifted[:, :-1] = ids[:, 1:]
    on = labels != -100
    assert torch.equal(labels[on], shifted[on])
    # labelled positions predict real tokens: never the last real position nor padding
    nxt = torch.zeros_like(mask)
    nxt[:, :-1] = mask[:, 1:]
    assert not (on & (nxt == 0)).any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_labels_aligned_on_completion_tokens(tok, fmt):
    examples = tokenize_rows(ROWS[fmt], fmt, tok, max_length=128)
    batch = collate(examples, fmt, tok.pad_token_id)
    check_labels(batch)
    R, B = batch["num_roles"], batch["batch_size"]
    assert B == len(ROWS[fmt]) and batch["input_ids"].shape[0] == R * B
    for b, ex in enumerate(examples):
        for r, (seq, n_prompt) in enumerate(
            zip(ex["input_ids"], ex["prompt_lengths"], strict=True)
        ):
            row = batch["labels"][r * B + b]
            expected = torch.full_like(row, -100)
            expected[n_prompt - 1 : len(seq) - 1] = torch.tensor(seq[n_prompt:])
            assert torch.equal(row, expected)
            assert seq[-1] == tok.eos_token_id and row[len(seq) - 2] == tok.eos_token_id


def test_role_major_order(tok):
    fmt = "pair_rationale"
    examples = tokenize_rows(ROWS[fmt], fmt, tok, max_length=256)
    batch = collate(examples, fmt, tok.pad_token_id)
    B, R = 2, len(ROLES[fmt])
    assert batch["num_roles"] == R and batch["batch_size"] == B
    assert batch["example_ids"].tolist() == [0, 1]
    for r in range(R):
        for b in range(B):
            seq = examples[b]["input_ids"][r]
            assert batch["input_ids"][r * B + b, : len(seq)].tolist() == seq
            assert batch["attention_mask"][r * B + b].sum() == len(seq)
    # role 2 is the rationale scored after the documented template
    row = ROWS[fmt][1]
    shown = RATIONALE_TEMPLATE.format(
        prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"]
    )
    expected = [
        tok.bos_token_id,
        *ids_of(tok, shown),
        *ids_of(tok, row["rationale"]),
        tok.eos_token_id,
    ]
    assert examples[1]["input_ids"][2] == expected


def test_kto_kl_role_pairs_with_next_completion(tok):
    rows = ROWS["kto"]
    examples = tokenize_rows(rows, "kto", tok, max_length=64)
    for i, ex in enumerate(examples):
        prompt = [tok.bos_token_id, *ids_of(tok, rows[i]["prompt"])]
        nxt = rows[(i + 1) % len(rows)]["completion"]
        assert ex["input_ids"][1] == prompt + ids_of(tok, nxt) + [tok.eos_token_id]
    batch = collate(examples, "kto", tok.pad_token_id)
    assert batch["kto_label"].tolist() == [True, False, True]
    assert batch["kto_label"].dtype == torch.bool


def test_list_pads_with_dummy_responses(tok):
    examples = tokenize_rows(ROWS["list"], "list", tok, max_length=64)
    batch = collate(examples, "list", tok.pad_token_id)
    B, K = 2, 3
    assert batch["num_roles"] == K and batch["input_ids"].shape[0] == K * B
    assert batch["list_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["scores"].tolist() == [[2.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    dummy = 2 * B + 1  # role 2 of example 1
    assert (batch["labels"][dummy] == -100).all()
    assert batch["attention_mask"][dummy].tolist()[:2] == [1, 0]
    check_labels(batch)


def test_chat_rows_use_the_chat_template(tok, tmp_path):
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    rows = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": "Go away.",
        }
    ]
    loaded = load_rows(str(write_jsonl(tmp_path / "chat.jsonl", rows)), "pair")
    assert loaded == [{"prompt": prompt, "chosen": "Hello!", "rejected": "Go away."}]
    (ex,) = tokenize_rows(loaded, "pair", tok, max_length=64)
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|system|>Be kind.<|eos|><|user|>Hi?<|eos|><|assistant|>"
    p = ids_of(tok, rendered)
    assert ex["input_ids"][0] == p + ids_of(tok, "Hello!") + [tok.eos_token_id]
    # a string prompt in a chat row becomes one user message
    rows = [
        {"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "No."}
    ]
    loaded = load_rows(str(write_jsonl(tmp_path / "chat2.jsonl", rows)), "pair")
    assert loaded[0]["prompt"] == [{"role": "user", "content": "Hi?"}]


def test_sft_messages_rows(tok, tmp_path):
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]
    path = write_jsonl(tmp_path / "msgs.jsonl", [{"messages": msgs}, {"messages": msgs[:1]}])
    with pytest.raises(DataError, match=r"line 2: field 'messages' must end with an assistant"):
        load_rows(str(path), "sft")
    path = write_jsonl(tmp_path / "msgs.jsonl", [{"messages": msgs}])
    assert load_rows(str(path), "sft") == [{"prompt": msgs[:1], "completion": "Hello!"}]


def test_split_rows():
    rows = [{"i": i} for i in range(100)]
    train, held = split_rows(rows, 0.1, seed=3)
    assert len(train) == 90 and len(held) == 10
    assert sorted(r["i"] for r in train + held) == list(range(100))
    assert split_rows(rows, 0.1, seed=3) == (train, held)
    assert split_rows(rows, 0.1, seed=4) != (train, held)
    assert split_rows(rows[:5], 0.01, seed=0)[1] != []  # a positive fraction holds out >= 1
    assert split_rows(rows, 0.0, seed=0) == (rows, [])


# --- bundled tokenizer, model config, generator -----------------------------------------------


def test_bundled_tokenizer(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    texts = [r["chosen"] for r in load_rows(str(default_data("pair")), "pair")[:50]]
    texts += ["Ünïcödé → 字 🙂 and  double  spaces\n\ttabs", ""]
    for text in texts:
        assert tok.decode(ids_of(tok, text)) == text
    assert tok(texts[0])["input_ids"][0] == tok.bos_token_id
    # the bundled text is compact under this BPE: a typical answer is a few dozen tokens
    assert len(ids_of(tok, texts[0])) < 40


def test_bundled_model_config(tok):
    cfg = LlamaConfig.from_pretrained(bundled_model_config_path())
    assert cfg.vocab_size % 64 == 0 and len(tok) <= cfg.vocab_size < len(tok) + 64
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (128, 2, 4)
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id


def test_generator_is_deterministic(tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_assets.py"
    spec = importlib.util.spec_from_file_location("make_assets", script)
    make_assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_assets)
    make_assets.generate(tmp_path / "a")
    bundled = bundled_tokenizer_path().parent
    for rel in [
        "data/pair_rationale.jsonl",
        "data/kto.jsonl",
        "data/list.jsonl",
        "data/sft.jsonl",
        "model/config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
    ]:
        assert (tmp_path / "a" / rel).read_bytes() == (bundled / rel).read_bytes(), rel
    # the trained BPE itself: same vocabulary and merges (independent of JSON formatting)
    new = json.loads((tmp_path / "a/tokenizer/tokenizer.json").read_text())
    old = json.loads((bundled / "tokenizer/tokenizer.json").read_text())
    assert new["model"]["vocab"] == old["model"]["vocab"]
    assert new["model"]["merges"] == old["model"]["merges"]
    assert new["added_tokens"] == old["added_tokens"]
