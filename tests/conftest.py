"""Shared fixtures: a tiny Llama with the bundled tokenizer, and 48 rows of each bundled format."""

import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fastpref.families.lm_formats import FORMATS, default_data
from fastpref.paths import bundled_tokenizer_path


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for fmt in FORMATS:
        lines = default_data(fmt).read_text().splitlines()[:48]
        (root / f"{fmt}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def own_process_group():
    """Every module: a training in this process joins a one-rank gloo group and sets RANK,
    MASTER_PORT, ...; leave no group or env vars behind for the next module (a subprocess that
    inherited them would join the dead group's port)."""
    env = dict(os.environ)
    yield
    from fastpref.train.engine import shutdown_distributed

    shutdown_distributed()
    os.environ.clear()
    os.environ.update(env)
