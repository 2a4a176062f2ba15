"""Tiny random models for the AEPO tests: a reward model on the bundled tokenizer and a BERT
encoder on all-MiniLM-L6-v2's tokenizer (shapes of the real thing, seconds to build)."""

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from fastpref.models.encoder import default_embedding_model
from fastpref.paths import bundled_tokenizer_path


def build_tiny_rm(path: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_encoder(path: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(str(default_embedding_model()))
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
