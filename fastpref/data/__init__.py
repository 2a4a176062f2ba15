"""fastpref.data: reading and validating rows, tokenisation and collation helpers for every family.

    unit, records = read_records("prefs.jsonl")               # (line, record) pairs
    rows = load_records("prefs.jsonl", validate, columns={"prompt": "question"})
    train, held = split_rows(rows, eval_fraction=0.1, seed=0)
    examples = tokenize_examples(train, roles, tokenizer, max_length=512)
    batch = collate_roles(examples[:8], tokenizer.pad_token_id)

What a format's fields are, and what its roles are, is each family's (``fastpref.families``).
"""

from fastpref.data.collate import collate_roles, pad_and_label
from fastpref.data.rows import (
    Row,
    load_records,
    loads_json,
    read_records,
    split_rows,
    type_name,
)
from fastpref.data.tokenize import Encoder, tokenize_examples
from fastpref.errors import DataError
from fastpref.paths import bundled_model_config_path, bundled_tokenizer_path

__all__ = [
    "DataError",
    "Encoder",
    "Row",
    "bundled_model_config_path",
    "bundled_tokenizer_path",
    "collate_roles",
    "load_records",
    "loads_json",
    "pad_and_label",
    "read_records",
    "split_rows",
    "tokenize_examples",
    "type_name",
]
